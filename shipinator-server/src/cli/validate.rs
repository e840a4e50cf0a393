//! `shipinator validate` and `shipinator schema`.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;
use shipinator_core::config::{self, ConfigError, LoadError};

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE, OutputFormat};

/// Arguments of `shipinator validate`.
#[derive(Debug, Args)]
pub(crate) struct ValidateArgs {
    /// The file to check.
    #[arg(default_value = ".shipinator.yaml")]
    pub(crate) path: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub(crate) output: OutputFormat,
}

/// Checks the file; 0 when valid, 1 when invalid, 2 when it cannot be read.
pub(crate) fn run(args: &ValidateArgs) -> u8 {
    match config::load(&args.path) {
        Ok(_) => {
            match args.output {
                OutputFormat::Human => println!("{}: ok", args.path.display()),
                OutputFormat::Json => println!("{}", json_report(&[])),
            }
            EXIT_OK
        }
        Err(LoadError::Invalid(errors)) => {
            match args.output {
                OutputFormat::Human => {
                    // Best effort: the source lines are only decoration.
                    let source = std::fs::read(&args.path)
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default();
                    eprint!("{}", human_report(errors.errors(), &source));
                }
                OutputFormat::Json => println!("{}", json_report(errors.errors())),
            }
            EXIT_FAILED
        }
        Err(e @ LoadError::Io { .. }) => {
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            eprintln!("error: {e}{cause}");
            EXIT_USAGE
        }
    }
}

/// Prints the JSON Schema of the file format.
pub(crate) fn schema() -> u8 {
    match serde_json::to_string_pretty(&config::json_schema()) {
        Ok(text) => {
            println!("{text}");
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: cannot render the schema: {e}");
            EXIT_USAGE
        }
    }
}

/// `{"errors":[{"file","line","column","code","message"}]}`.
pub(crate) fn json_report(errors: &[ConfigError]) -> serde_json::Value {
    let items: Vec<serde_json::Value> = errors
        .iter()
        .map(|e| {
            serde_json::json!({
                "file": e.file,
                "line": e.line,
                "column": e.column,
                "code": e.code.as_str(),
                "message": e.message,
            })
        })
        .collect();
    serde_json::json!({ "errors": items })
}

/// rustc-style: `error[code]: message`, ` --> file:line:col`, the source line and a caret.
pub(crate) fn human_report(errors: &[ConfigError], source: &str) -> String {
    let lines: Vec<&str> = source.lines().collect();
    let mut out = String::new();
    for e in errors {
        let _ = writeln!(out, "error[{}]: {}", e.code, e.message);
        let line_text = usize::try_from(e.line)
            .ok()
            .and_then(|l| l.checked_sub(1))
            .and_then(|l| lines.get(l));
        let width = e.line.to_string().len();
        let pad = " ".repeat(width);
        let _ = writeln!(out, "{pad}--> {}:{}:{}", e.file, e.line, e.column);
        if let Some(text) = line_text {
            let shown: String = text
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            let caret_at = usize::try_from(e.column.saturating_sub(1))
                .unwrap_or(0)
                .min(shown.chars().count());
            let _ = writeln!(out, "{pad} |");
            let _ = writeln!(out, "{} | {shown}", e.line);
            let _ = writeln!(out, "{pad} | {}^", " ".repeat(caret_at));
        }
        out.push('\n');
    }
    let n = errors.len();
    let _ = writeln!(
        out,
        "error: {n} problem{} found",
        if n == 1 { "" } else { "s" }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_report_shows_line_and_caret() {
        let text = "build:\n  steps:\n    - name: a\n      runn: make\n    - run: x\n";
        let errors = config::parse("x.yaml", text).unwrap_err();
        let report = human_report(errors.errors(), text);
        expect_test::expect![[r#"
            error[unknown_key]: unknown key 'runn' in `build.steps[0]` (did you mean 'run'?)
             --> x.yaml:4:7
              |
            4 |       runn: make
              |       ^

            error[missing_key]: `build.steps[1]` has no `name`: add `name: <unique step name>`
             --> x.yaml:5:7
              |
            5 |     - run: x
              |       ^

            error: 2 problems found
        "#]]
        .assert_eq(&report);
    }

    #[test]
    fn json_report_shape() {
        let errors = config::parse("x.yaml", "biuld: {}\n").unwrap_err();
        let json = json_report(errors.errors());
        expect_test::expect![[r#"{"errors":[{"code":"unknown_key","column":1,"file":"x.yaml","line":1,"message":"unknown key 'biuld' in `the top level` (did you mean 'build'?)"}]}"#]]
        .assert_eq(&json.to_string());
    }
}
