//! Tests: the `.shipinator.yaml` parser and validator.
//!
//! The corpus lives in `tests/corpus/{valid,invalid}`; each invalid file's rendered errors are
//! pinned in the `.expected` file next to it (`UPDATE_EXPECT=1` rewrites them).

use std::path::{Path, PathBuf};
use std::time::Duration;

use proptest::prelude::*;

use crate::config::{
    self, ArtifactSelector, ConfigErrorCode, ConfigErrors, LoadError, MAX_FILE_BYTES, PipelineSpec,
    Template,
};
use crate::domain::ArtifactType;

fn corpus(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus files in {}", dir.display());
    files
}

fn name_of(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

fn parse_ok(text: &str) -> PipelineSpec {
    match config::parse("t.yaml", text) {
        Ok(spec) => spec,
        Err(e) => panic!("unexpected errors:\n{e}"),
    }
}

fn parse_err(text: &str) -> ConfigErrors {
    match config::parse("t.yaml", text) {
        Ok(spec) => panic!("expected errors, got {spec:#?}"),
        Err(e) => e,
    }
}

fn codes(errors: &ConfigErrors) -> Vec<ConfigErrorCode> {
    errors.errors().iter().map(|e| e.code).collect()
}

#[test]
fn every_valid_corpus_file_parses() {
    for path in corpus("valid") {
        let text = std::fs::read_to_string(&path).unwrap();
        if let Err(e) = config::parse(&name_of(&path), &text) {
            panic!("{} should be valid:\n{e}", path.display());
        }
        // The raw types' own serde derive agrees with the located walk.
        let walked = config::parse_raw(&name_of(&path), &text).unwrap();
        let derived: config::raw::RawPipeline =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(walked, derived, "{}", path.display());
    }
}

#[test]
fn every_invalid_corpus_file_matches_its_snapshot() {
    for path in corpus("invalid") {
        let text = std::fs::read_to_string(&path).unwrap();
        let file = format!("invalid/{}", name_of(&path));
        let rendered = match config::parse(&file, &text) {
            Ok(spec) => panic!("{} should be invalid, got {spec:#?}", path.display()),
            Err(e) => format!("{e}\n"),
        };
        expect_test::expect_file![path.with_extension("expected")].assert_eq(&rendered);
    }
}

#[test]
fn tdd_example_asks_for_a_helm_chart_output() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/invalid/tdd_example.yaml"),
    )
    .unwrap();
    let errors = parse_err(&text);
    assert_eq!(codes(&errors), [ConfigErrorCode::UnresolvedArtifact]);
    let e = &errors.errors()[0];
    assert_eq!((e.line, e.column), (27, 13));
    assert!(e.message.contains("add an output with `type: helm_chart`"));
}

#[test]
fn full_example_builds_the_expected_spec() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/valid/full.yaml"),
    )
    .unwrap();
    let spec = parse_ok(&text);
    assert_eq!(
        spec.triggers.push,
        Some(vec!["main".to_owned(), "release/*".to_owned()])
    );
    assert!(spec.triggers.pull_request);
    assert!(!spec.triggers.manual);

    let build = spec.build.as_ref().unwrap();
    assert_eq!(build.image.as_deref(), Some("golang:1.23"));
    assert_eq!(build.env["CGO_ENABLED"].source(), "0");
    let compile = &build.steps[0];
    assert_eq!(compile.timeout, Some(Duration::from_secs(600)));
    assert_eq!(compile.workdir.as_deref(), Some("src"));
    assert_eq!(compile.env["DEBUG"].source(), "true");
    assert_eq!(compile.outputs[0].artifact_type, ArtifactType::Binary);
    assert_eq!(compile.outputs[0].name.as_deref(), Some("app-binary"));
    let image = &build.steps[1];
    assert_eq!(image.timeout, Some(Duration::from_secs(5400)));
    assert_eq!(
        image.outputs[0].image_ref.as_ref().map(Template::source),
        Some("registry.local/myapp:{{ .commit }}")
    );
    assert!(build.steps.iter().all(|s| s.parallel_group.is_none()));

    let test = spec.test.as_ref().unwrap();
    let groups: Vec<Option<&str>> = test
        .steps
        .iter()
        .map(|s| s.parallel_group.as_deref())
        .collect();
    assert_eq!(
        groups,
        [
            Some("parallel-1"),
            Some("parallel-1"),
            Some("e2e"),
            Some("e2e"),
            None
        ]
    );
    assert_eq!(test.steps[2].timeout, Some(Duration::from_millis(500)));
    assert_eq!(
        test.steps[0].outputs[0].artifact_type,
        ArtifactType::Coverage
    );
    assert_eq!(
        test.steps[4].run,
        "golangci-lint run --out-format '{{.Path}}'"
    );

    let deploy = spec.deploy.as_ref().unwrap();
    assert_eq!(
        deploy.artifact,
        ArtifactSelector::Output("chart".to_owned())
    );
    assert_eq!(deploy.target, "local");
    assert_eq!(deploy.namespace.source(), "team-{{ .project }}");
    assert_eq!(deploy.values["replicas"].source(), "2");
    assert_eq!(deploy.branches, ["main"]);
    assert_eq!(deploy.timeout, Some(Duration::from_secs(900)));
}

#[test]
fn defaults_without_on_section() {
    let spec = parse_ok("build:\n  steps:\n    - name: a\n      run: make\n");
    assert_eq!(spec.triggers, config::Triggers::default());
    assert!(spec.test.is_none() && spec.deploy.is_none());
}

#[test]
fn push_without_branches_means_every_branch() {
    let spec = parse_ok("on:\n  push:\nbuild:\n  steps:\n    - name: a\n      run: make\n");
    assert_eq!(spec.triggers.push, Some(vec!["*".to_owned()]));
    assert!(!spec.triggers.pull_request);
    assert!(spec.triggers.manual);
}

#[test]
fn deploy_by_type_resolves_to_type_selector() {
    let text = "build:\n  steps:\n    - name: a\n      run: make\n      outputs:\n        - type: helm_chart\n          path: a.tgz\ndeploy:\n  artifact: helm_chart\n  target: local\n  namespace: default\n";
    let spec = parse_ok(text);
    assert_eq!(
        spec.deploy.unwrap().artifact,
        ArtifactSelector::Type(ArtifactType::HelmChart)
    );
}

#[test]
fn consecutive_parallel_runs_get_distinct_generated_groups() {
    let text = "test:\n  steps:\n    - {name: a, run: x, parallel: true}\n    - {name: b, run: x, parallel: true}\n    - {name: c, run: x}\n    - {name: d, run: x, parallel: true}\n    - {name: e, run: x, parallel_group: parallel-2}\n";
    let spec = parse_ok(text);
    let groups: Vec<Option<String>> = spec
        .test
        .unwrap()
        .steps
        .into_iter()
        .map(|s| s.parallel_group)
        .collect();
    assert_eq!(
        groups,
        [
            Some("parallel-1".to_owned()),
            Some("parallel-1".to_owned()),
            None,
            Some("parallel-3".to_owned()),
            Some("parallel-2".to_owned()),
        ]
    );
}

#[test]
fn template_in_run_names_the_environment_variable() {
    let errors = parse_err("build:\n  steps:\n    - name: a\n      run: echo {{ .branch }}\n");
    let e = &errors.errors()[0];
    assert_eq!(e.code, ConfigErrorCode::TemplateInRun);
    assert!(e.message.contains("$SHIPINATOR_BRANCH"), "{}", e.message);
    assert_eq!((e.line, e.column), (4, 17));
}

#[test]
fn every_template_variable_is_accepted_in_env() {
    let vars = config::TemplateVar::ALL
        .iter()
        .map(|v| format!("{{{{ .{} }}}}", v.name()))
        .collect::<Vec<_>>()
        .join("-");
    let text =
        format!("build:\n  env:\n    ALL: \"{vars}\"\n  steps:\n    - name: a\n      run: make\n");
    let spec = parse_ok(&text);
    assert_eq!(
        spec.build.unwrap().env["ALL"].parts().len(),
        2 * config::TemplateVar::ALL.len() - 1
    );
}

#[test]
fn errors_are_all_reported_and_sorted() {
    let errors = parse_err(
        "build:\n  steps:\n    - name: a\n      runn: x\n      timeout: 0s\n    - name: a\n      run: y\n      outputs:\n        - type: nope\n          path: p\n",
    );
    assert_eq!(
        codes(&errors),
        [
            // 'runn' is reported as misspelt; no "missing run" follows.
            ConfigErrorCode::UnknownKey,
            ConfigErrorCode::InvalidDuration,
            ConfigErrorCode::DuplicateStep,
            ConfigErrorCode::UnknownArtifactType,
        ]
    );
    let positions: Vec<(u64, u64)> = errors.errors().iter().map(|e| (e.line, e.column)).collect();
    let mut sorted = positions.clone();
    sorted.sort_unstable();
    assert_eq!(positions, sorted);
}

#[test]
fn duration_syntax() {
    use crate::config::validate::parse_duration;
    assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(
        parse_duration("1m30s250ms"),
        Ok(Duration::from_millis(90_250))
    );
    for bad in ["", "s", "30", "5x", "1.5h", "m5", "-1s", "1 h"] {
        assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
    }
    assert!(parse_duration("99999999999999999999999s").is_err());
}

#[test]
fn did_you_mean_for_keys() {
    let errors = parse_err("build:\n  steps:\n    - name: a\n      run: x\n      imgae: alpine\n");
    assert!(
        errors.errors()[0]
            .message
            .contains("(did you mean 'image'?)"),
        "{errors}"
    );
}

#[test]
fn error_codes_are_stable_snake_case() {
    for code in ConfigErrorCode::ALL {
        let s = code.as_str();
        assert!(s.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{s}");
    }
    let mut all: Vec<&str> = ConfigErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), ConfigErrorCode::ALL.len());
}

#[test]
fn messages_are_lowercase() {
    for path in corpus("invalid") {
        let text = std::fs::read_to_string(&path).unwrap();
        for e in parse_err(&text).errors() {
            let first = e.message.chars().next().unwrap();
            assert!(!first.is_uppercase(), "{}: {}", path.display(), e.message);
        }
    }
}

// --- hostile input -----------------------------------------------------------------------------

fn refused(errors: &ConfigErrors, code: ConfigErrorCode) {
    assert_eq!(codes(errors), [code], "{errors}");
}

#[test]
fn alias_bomb_is_refused() {
    let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..=9 {
        let prev = i - 1;
        text.push_str(&format!(
            "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
        ));
    }
    text.push_str("build: *a9\n");
    refused(&parse_err(&text), ConfigErrorCode::YamlTooComplex);
}

#[test]
fn deep_block_nesting_is_refused() {
    let text = format!("build:\n{}x\n", "- ".repeat(10_000));
    refused(&parse_err(&text), ConfigErrorCode::YamlTooComplex);
}

#[test]
fn deep_flow_nesting_is_refused() {
    let text = format!("build: {}{}", "[".repeat(10_000), "]".repeat(10_000));
    refused(&parse_err(&text), ConfigErrorCode::YamlTooComplex);
    let text = format!("build: {}", "{a: ".repeat(10_000));
    refused(&parse_err(&text), ConfigErrorCode::YamlTooComplex);
}

#[test]
fn files_over_the_limit_are_refused() {
    let mut text = String::from("build:\n  steps:\n    - name: a\n      run: make\n");
    while text.len() <= MAX_FILE_BYTES {
        text.push_str("# padding padding padding padding padding padding padding\n");
    }
    let errors = parse_err(&text);
    refused(&errors, ConfigErrorCode::FileTooLarge);
    assert!(errors.errors()[0].message.contains("1 MiB"));
}

#[test]
fn many_nodes_are_refused() {
    let mut text = String::from("build:\n  steps:\n    - name: a\n      run: make\n      env:\n");
    let mut i = 0;
    while text.len() < MAX_FILE_BYTES - 100 {
        text.push_str(&format!("        - {i}\n"));
        i += 1;
    }
    // Either refused by the node budget or rejected as a wrong type: never accepted, never a
    // panic.
    let errors = parse_err(&text);
    assert_eq!(errors.len(), 1, "{errors}");
}

// --- load ----------------------------------------------------------------------------------------

#[test]
fn load_distinguishes_io_from_invalid() {
    let dir = std::env::temp_dir().join(format!("shipinator-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("missing.yaml");
    assert!(matches!(config::load(&missing), Err(LoadError::Io { .. })));

    let invalid = dir.join("invalid.yaml");
    std::fs::write(&invalid, "biuld: {}\n").unwrap();
    match config::load(&invalid) {
        Err(LoadError::Invalid(e)) => {
            assert_eq!(e.errors()[0].file, invalid.display().to_string());
        }
        other => panic!("{other:?}"),
    }

    let not_utf8 = dir.join("latin1.yaml");
    std::fs::write(&not_utf8, b"build:\n  steps: caf\xe9\n").unwrap();
    match config::load(&not_utf8) {
        Err(LoadError::Invalid(e)) => {
            let e = &e.errors()[0];
            assert_eq!(
                (e.line, e.column, e.code),
                (2, 13, ConfigErrorCode::YamlSyntax)
            );
        }
        other => panic!("{other:?}"),
    }

    let valid = dir.join("valid.yaml");
    std::fs::write(&valid, "build:\n  steps:\n    - name: a\n      run: make\n").unwrap();
    assert!(config::load(&valid).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

// --- never panics --------------------------------------------------------------------------------

fn valid_texts() -> Vec<String> {
    corpus("valid")
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn parse_never_panics_on_arbitrary_strings(text in ".{0,400}") {
        let _ = config::parse("p.yaml", &text);
    }

    #[test]
    fn parse_never_panics_on_yamlish_strings(
        text in "([a-z_ :\\-\\[\\]{}&*!|>'\"#\\n.]|\\{\\{ \\.[a-z]+ \\}\\}){0,300}"
    ) {
        let _ = config::parse("p.yaml", &text);
    }

    #[test]
    fn parse_never_panics_on_mutated_valid_yaml(
        which in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..4, any::<char>()), 1..8),
    ) {
        let texts = valid_texts();
        let mut chars: Vec<char> = texts[which.index(texts.len())].chars().collect();
        for (at, op, c) in edits {
            if chars.is_empty() {
                chars.push(c);
                continue;
            }
            let i = at.index(chars.len());
            match op {
                0 => chars[i] = c,
                1 => chars.insert(i, c),
                2 => { chars.remove(i); }
                _ => {
                    let j = at.index(chars.len().max(2) - 1);
                    let dup: Vec<char> = chars[j.min(i)..j.max(i)].to_vec();
                    chars.splice(i..i, dup);
                }
            }
        }
        let text: String = chars.into_iter().collect();
        if let Err(errors) = config::parse("m.yaml", &text) {
            for e in errors.errors() {
                prop_assert!(e.line >= 1 && e.column >= 1, "{e}");
                prop_assert!(!e.message.is_empty());
            }
        }
    }
}
