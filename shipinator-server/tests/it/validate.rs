//! `shipinator validate` and `shipinator schema`: the real binary, its exit codes and output,
//! and the JSON Schema against the config corpus.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn corpus(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shipinator-core/tests/corpus")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", dir.display());
    files
}

fn shipinator(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shipinator"))
        .args(args)
        .current_dir(cwd)
        .env_remove("SHIPINATOR_LOG")
        .output()
        .unwrap()
}

fn schema_value() -> serde_json::Value {
    let out = shipinator(&["schema"], Path::new(env!("CARGO_MANIFEST_DIR")));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A YAML file as a JSON value, the way an editor's schema validation sees it.
fn yaml_to_json(text: &str) -> serde_json::Value {
    let options = serde_saphyr::options! { strict_booleans: true };
    serde_saphyr::from_str_with_options(text, options).unwrap()
}

#[test]
fn every_valid_example_validates_against_the_schema() {
    let validator = jsonschema::validator_for(&schema_value()).unwrap();
    for path in corpus("valid") {
        let value = yaml_to_json(&std::fs::read_to_string(&path).unwrap());
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
    }
}

#[test]
fn unknown_keys_fail_the_schema() {
    let validator = jsonschema::validator_for(&schema_value()).unwrap();
    let cases = [
        "biuld:\n  steps:\n    - name: a\n      run: make\n",
        "build:\n  stesp:\n    - name: a\n      run: make\n",
        "build:\n  steps:\n    - name: a\n      runn: make\n",
        "build:\n  steps:\n    - name: a\n      run: make\n      outputs:\n        - type: binary\n          pth: x\n",
        "deploy:\n  artifact: a\n  target: local\n  namespace: d\n  colour: blue\n",
        "on:\n  push:\n    branch: [main]\nbuild:\n  steps:\n    - {name: a, run: b}\n",
    ];
    for case in cases {
        assert!(
            !validator.is_valid(&yaml_to_json(case)),
            "accepted:\n{case}"
        );
    }
    let unknown = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shipinator-core/tests/corpus/invalid/unknown_keys.yaml");
    let value = yaml_to_json(&std::fs::read_to_string(unknown).unwrap());
    assert!(!validator.is_valid(&value));
}

#[test]
fn schema_rejects_unknown_types_and_missing_run() {
    let validator = jsonschema::validator_for(&schema_value()).unwrap();
    let bad_type = "build:\n  steps:\n    - name: a\n      run: make\n      outputs:\n        - {type: binray, path: x}\n";
    assert!(!validator.is_valid(&yaml_to_json(bad_type)));
    let no_run = "build:\n  steps:\n    - name: a\n";
    assert!(!validator.is_valid(&yaml_to_json(no_run)));
}

#[test]
fn validate_exit_codes_and_json_shape() {
    let dir = tempfile::tempdir().unwrap();
    let valid = corpus("valid").into_iter().next().unwrap();
    std::fs::copy(&valid, dir.path().join(".shipinator.yaml")).unwrap();

    // Default path, valid file.
    let out = shipinator(&["validate"], dir.path());
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = shipinator(&["validate", "--output", "json"], dir.path());
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json, serde_json::json!({ "errors": [] }));

    // Invalid file: exit 1, every error with the five fields.
    let invalid = dir.path().join("bad.yaml");
    std::fs::write(&invalid, "biuld: {}\ntest:\n  steps:\n    - name: a\n").unwrap();
    let out = shipinator(&["validate", "bad.yaml", "--output", "json"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let errors = json["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{json}");
    for e in errors {
        let obj = e.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["code", "column", "file", "line", "message"]);
        assert_eq!(obj["file"], "bad.yaml");
        assert!(obj["line"].as_u64().unwrap() >= 1);
    }
    assert_eq!(errors[0]["code"], "unknown_key");
    assert_eq!(errors[1]["code"], "missing_key");

    // Human output: rustc-like, on stderr.
    let out = shipinator(&["validate", "bad.yaml"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error[unknown_key]: unknown key 'biuld'"),
        "{stderr}"
    );
    assert!(stderr.contains(" --> bad.yaml:1:1"), "{stderr}");
    assert!(stderr.contains("1 | biuld: {}"), "{stderr}");

    // Missing file: exit 2.
    let out = shipinator(&["validate", "missing.yaml"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read missing.yaml"));

    // Usage error: exit 2.
    let out = shipinator(&["validate", "--output", "xml"], dir.path());
    assert_eq!(out.status.code(), Some(2));
}
