//! The repository's own pipelines: `.shipinator.yaml` (run in full by CI's dogfood phase) and
//! the hello example, run from the repository's root as the README's quick start does.

use std::path::PathBuf;

use super::run::shipinator;

fn repository_root() -> PathBuf {
    // Cargo's value at run time: the compile-time one names where the test was built, which
    // in a pipeline's test stage is the build stage's workspace.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest.parent().unwrap().to_path_buf()
}

#[test]
fn the_repositorys_pipeline_builds_tests_and_lints_shipinator() {
    let root = repository_root();
    let out = shipinator(&["validate", ".shipinator.yaml"], &root);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = std::fs::read_to_string(root.join(".shipinator.yaml")).unwrap();
    let commands: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("run: "))
        .collect();
    for needed in ["cargo build", "scripts/test.sh", "cargo clippy"] {
        assert!(
            commands.iter().any(|c| c.contains(needed)),
            "no step runs {needed}: {commands:?}"
        );
    }
    // Every command says it runs inside a shipinator run, so the suite it starts never starts
    // another dogfood run.
    for c in &commands {
        assert!(c.starts_with("SHIPINATOR_DOGFOOD=1 "), "{c}");
    }
}

#[test]
fn the_hello_example_runs_from_the_repository_root() {
    let root = repository_root();
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap();
    // The committed example (a copy of that directory of HEAD), then the working tree's.
    for mode in [None, Some("--dirty")] {
        let mut args = vec![
            "run",
            "examples/pipelines/hello",
            "--data-dir",
            data_dir,
            "--output",
            "json",
        ];
        args.extend(mode);
        let out = shipinator(&args, &root);
        assert_eq!(out.status.code(), Some(0), "{mode:?}: {out:?}");
        let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(record["run"]["status"], "success", "{record}");
        let types: Vec<&str> = record["artifacts"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a["artifact_type"].as_str())
            .collect();
        assert!(types.contains(&"binary"), "{types:?}");
    }
}
