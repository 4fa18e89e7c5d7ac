//! Generated documentation stays in step with the command line: the committed
//! manual page and the shell completions.

use std::path::Path;
use std::process::Command;

/// `man/sac.1` is `sac::cli::man_page()` as committed. After changing a flag
/// or its help, regenerate it with `SAC_BLESS=1 cargo test --test docs`.
#[test]
fn man_page_is_in_sync() {
    let rendered = sac::cli::man_page().expect("render the manual page");
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
    let page = String::from_utf8(sac::cli::man_page().unwrap()).unwrap();
    for section in [
        "SAC COMPRESS",
        "SAC ASK",
        "SAC INFO",
        "SAC MODEL-INFO",
        "SAC TRAIN",
        "SAC ADAPTER",
        "SAC ADAPTER IMPORT",
        "SAC COMPLETIONS",
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
