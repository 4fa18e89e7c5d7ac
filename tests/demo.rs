//! The README's offline demo: the tiny model and SAC adapter shipped under
//! assets/demo compress the demo document and answer its questions, run
//! from the repository root with the README's own commands.

mod common;

use std::path::Path;

use common::{run_ok, sac};

#[test]
fn the_readme_demo_compresses_and_answers_offline() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for command in [
        "sac compress assets/demo/doc.txt --adapter assets/demo/adapter -o demo.sack",
        "sac ask demo.sack --batch assets/demo/questions.txt",
    ] {
        assert!(readme.contains(command), "README lost: {command}");
    }
    let dir = tempfile::tempdir().unwrap();
    let sack = dir.path().join("demo.sack");
    // Run from elsewhere, as a user with the adapter in another place does:
    // the adapter finds its model beside it, not under the working directory.
    run_ok(
        sac()
            .current_dir(dir.path())
            .arg("compress")
            .arg(root.join("assets/demo/doc.txt"))
            .arg("--adapter")
            .arg(root.join("assets/demo/adapter"))
            .args(["-q", "-o", "demo.sack"]),
    );
    let info = String::from_utf8(run_ok(sac().arg("info").arg(&sack))).unwrap();
    assert!(info.contains("compressor  sac, ratio 4"), "{info}");

    let questions = std::fs::read_to_string(root.join("assets/demo/questions.txt")).unwrap();
    let out = run_ok(
        sac()
            .current_dir(root)
            .arg("ask")
            .arg(&sack)
            .args(["--batch", "assets/demo/questions.txt"]),
    );
    let answers: Vec<serde_json::Value> = String::from_utf8_lossy(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), questions.lines().count());
    for answer in &answers {
        let text = answer["answer"].as_str().unwrap();
        assert!(!text.trim().is_empty(), "empty answer: {answer}");
    }
}
