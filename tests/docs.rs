//! Generated documentation stays in step with the command line: the committed
//! manual page and the shell completions.

use std::path::Path;
use std::process::Command;

/// The manual page, as the binary prints it.
fn man_page() -> Vec<u8> {
    let out = Command::new(env!("CARGO_BIN_EXE_sac"))
        .arg("man")
        .output()
        .expect("run sac man");
    assert!(out.status.success(), "sac man failed");
    out.stdout
}

/// `man/sac.1` is what `sac man` prints, as committed. After changing a flag
/// or its help, regenerate it with `SAC_BLESS=1 cargo test --test docs`.
#[test]
fn man_page_is_in_sync() {
    let rendered = man_page();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("man/sac.1");
    if std::env::var_os("SAC_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &rendered).expect("write man/sac.1");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    if committed != rendered {
        let committed = String::from_utf8_lossy(&committed);
        let rendered = String::from_utf8_lossy(&rendered);
        let first_difference = committed
            .lines()
            .zip(rendered.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(committed.lines().count().min(rendered.lines().count()));
        panic!(
            "man/sac.1 is out of date (first difference at line {}: committed {:?}, rendered {:?}); \
             regenerate it with `SAC_BLESS=1 cargo test --test docs`",
            first_difference + 1,
            committed.lines().nth(first_difference).unwrap_or("<end>"),
            rendered.lines().nth(first_difference).unwrap_or("<end>"),
        );
    }
}

#[test]
fn the_manual_covers_every_subcommand() {
    let page = String::from_utf8(man_page()).unwrap();
    for section in [
        "SAC COMPRESS",
        "SAC ASK",
        "SAC INFO",
        "SAC MODEL-INFO",
        "SAC TRAIN",
        "SAC ADAPTER",
        "SAC ADAPTER IMPORT",
        "SAC COMPLETIONS",
        "SAC MAN",
    ] {
        assert!(
            page.contains(&format!(".SH \"{section}\"")),
            "no section {section}"
        );
    }
    assert!(page.contains("kv\\-encoding"), "no --kv-encoding option");
}

#[test]
fn bash_completions_know_the_subcommands() {
    let out = Command::new(env!("CARGO_BIN_EXE_sac"))
        .args(["completions", "bash"])
        .output()
        .expect("run sac completions");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = String::from_utf8(out.stdout).expect("completions are UTF-8");
    assert!(script.contains("_sac()"), "not a bash function:\n{script}");
    assert!(script.contains("complete -F _sac"), "{script}");
    for word in [
        "compress",
        "ask",
        "info",
        "model-info",
        "train",
        "completions",
    ] {
        assert!(script.contains(word), "no `{word}` in:\n{script}");
    }
}

/// README.md and docs/*.md with their paths, relative to the repository.
fn documents() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut docs = vec!["README.md".to_string()];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") {
            docs.push(format!("docs/{name}"));
        }
    }
    docs.into_iter()
        .map(|d| {
            let text = std::fs::read_to_string(root.join(&d)).unwrap();
            (d, text)
        })
        .collect()
}

/// A clone has nothing beside the repository: the documentation points at
/// nothing outside it, and each relative link names a file it holds.
#[test]
fn documentation_stays_inside_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (doc, text) in documents() {
        for outside in ["/work/", "shared/reference"] {
            assert!(!text.contains(outside), "{doc} points at {outside}");
        }
        let base = Path::new(&doc).parent().unwrap();
        for link in text.split("](").skip(1) {
            let target = link.split([')', '#']).next().unwrap();
            if target.is_empty() || target.contains("://") {
                continue;
            }
            assert!(
                root.join(base).join(target).exists(),
                "{doc} links {target}, which the repository lacks"
            );
        }
    }
}

/// The README's table of .sack sizes follows its own formula: layers x
/// kv_heads x head_dim x 2 x bytes per value / ratio, for Llama-3.2-1B
/// (16 x 8 x 64) and SmolLM2-135M (30 x 3 x 64) at ratios 1, 4 and 8.
#[test]
fn the_readme_size_table_adds_up() {
    let (_, readme) = documents().remove(0);
    let mut rows = 0;
    for line in readme.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let encoding = cells.get(1).map(|c| c.trim_end_matches(" (default)"));
        if cells.len() != 10 || !matches!(encoding, Some("f32" | "bf16" | "f16" | "q8" | "q4")) {
            continue;
        }
        let number = |c: &str| c.replace(',', "").parse::<f64>().unwrap();
        let per_value = number(cells[2]);
        let mut expected = Vec::new();
        for values_per_token in [16.0 * 8.0 * 64.0 * 2.0, 30.0 * 3.0 * 64.0 * 2.0] {
            for ratio in [1.0, 4.0, 8.0] {
                expected.push(values_per_token * per_value / ratio);
            }
        }
        let stated: Vec<f64> = cells[3..9].iter().map(|c| number(c)).collect();
        assert_eq!(stated, expected, "{line}");
        rows += 1;
    }
    assert_eq!(rows, 5, "the README's size table has a row per encoding");
}
