//! `.shipinator.yaml`: raw serde types mirroring the file, one validation pass into a
//! [`PipelineSpec`], and located, actionable errors.

//!
//! [`parse`] turns text into a [`PipelineSpec`] in three steps: serde-saphyr reads the YAML into
//! a located tree within fixed budgets ([`MAX_FILE_BYTES`], nesting depth, aliases), the tree
//! becomes the [`raw`] types (every unknown key and wrong type is reported), and one validation
//! pass checks meaning (names, templates, durations, artifact references). Every problem found is
//! returned, each with file, line, column and a stable [`ConfigErrorCode`].
//!
//! `parallel` and `parallel_group` are accepted in the test stage only; build steps run one
//! after another. The steps of one `parallel_group` must be adjacent.

mod error;
mod node;
pub mod raw;
mod spec;
pub(crate) mod validate;

use std::io::Read;
use std::path::Path;

pub use error::{ConfigError, ConfigErrorCode, ConfigErrors, LoadError};
pub use spec::{
    ArtifactSelector, DeploySpec, OutputSpec, PipelineSpec, StageSpec, StepSpec, Template,
    TemplateContext, TemplateError, TemplatePart, TemplateVar, Triggers,
};

/// Largest accepted file, in bytes (1 MiB).
pub const MAX_FILE_BYTES: usize = 1024 * 1024;

/// The conventional file name.
pub const FILE_NAME: &str = ".shipinator.yaml";

/// Parses and validates a `.shipinator.yaml`. `file` is only used in error locations.
///
/// # Errors
/// Every problem found: invalid or hostile YAML, unknown keys, missing or invalid values,
/// unresolvable references. Never panics.
pub fn parse(file: &str, text: &str) -> Result<PipelineSpec, ConfigErrors> {
    let mut cx = validate::Cx::new(file, text);
    let spec = parse_into(&mut cx, text);
    match ConfigErrors::new(cx.into_errors()) {
        Some(errors) => Err(errors),
        None => spec.ok_or_else(|| internal_error(file)),
    }
}

/// Parses into the [`raw`] types only (keys and value shapes), without the validation pass.
///
/// # Errors
/// Invalid or hostile YAML, unknown keys and wrong value types.
pub fn parse_raw(file: &str, text: &str) -> Result<raw::RawPipeline, ConfigErrors> {
    let mut cx = validate::Cx::new(file, text);
    let raw = tree(&mut cx, text).map(|root| cx.raw_pipeline(&root));
    match ConfigErrors::new(cx.into_errors()) {
        Some(errors) => Err(errors),
        None => Ok(raw.unwrap_or_default()),
    }
}

fn internal_error(file: &str) -> ConfigErrors {
    // `spec` only returns `None` after recording an error; stay located regardless.
    ConfigErrors::one(ConfigError {
        file: file.to_owned(),
        line: 1,
        column: 1,
        code: ConfigErrorCode::InvalidValue,
        message: "the file could not be validated".to_owned(),
    })
}

fn tree(cx: &mut validate::Cx<'_>, text: &str) -> Option<node::Node> {
    if text.len() > MAX_FILE_BYTES {
        cx.err(
            node::Pos::START,
            ConfigErrorCode::FileTooLarge,
            format!(
                "the file is {} bytes, more than the limit of {MAX_FILE_BYTES} bytes (1 MiB): shorten it",
                text.len()
            ),
        );
        return None;
    }
    match node::parse_tree(text) {
        Ok(Some(root)) if root.kind != node::Kind::Null => Some(root),
        Ok(_) => {
            cx.err(
                node::Pos::START,
                ConfigErrorCode::EmptyFile,
                "the file is empty: add a `build`, `test` or `deploy` section (see `shipinator schema`)"
                    .to_owned(),
            );
            None
        }
        Err(e) if e.too_complex => {
            cx.err(
                e.pos,
                ConfigErrorCode::YamlTooComplex,
                format!("the yaml is too complex to accept: {}", e.message),
            );
            None
        }
        Err(e) => {
            cx.err(
                e.pos,
                ConfigErrorCode::YamlSyntax,
                format!("invalid yaml: {}", e.message),
            );
            None
        }
    }
}

fn parse_into(cx: &mut validate::Cx<'_>, text: &str) -> Option<PipelineSpec> {
    let root = tree(cx, text)?;
    let raw = cx.raw_pipeline(&root);
    cx.spec(&raw, root.pos)
}

/// Reads and parses a file; the error distinguishes I/O failures from an invalid file.
///
/// # Errors
/// [`LoadError::Io`] when the file cannot be read, [`LoadError::Invalid`] otherwise.
pub fn load(path: &Path) -> Result<PipelineSpec, LoadError> {
    let file = path.display().to_string();
    let io = |source| LoadError::Io {
        path: path.to_owned(),
        source,
    };
    let handle = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    let limit = u64::try_from(MAX_FILE_BYTES).unwrap_or(u64::MAX) + 1;
    handle.take(limit).read_to_end(&mut bytes).map_err(io)?;
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) if e.as_bytes().len() > MAX_FILE_BYTES => {
            // Too large anyway; report that rather than a cut-off character.
            let text = String::from_utf8_lossy(e.as_bytes()).into_owned();
            return parse(&file, &text).map_err(LoadError::Invalid);
        }
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let before = &e.as_bytes()[..valid];
            let line = before.iter().filter(|b| **b == b'\n').count() as u64 + 1;
            let line_start = before
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |p| p + 1);
            let column = String::from_utf8_lossy(&before[line_start..])
                .chars()
                .count() as u64
                + 1;
            let error = ConfigError {
                file,
                line,
                column,
                code: ConfigErrorCode::YamlSyntax,
                message: "the file is not valid utf-8: save it as utf-8".to_owned(),
            };
            return Err(LoadError::Invalid(ConfigErrors::one(error)));
        }
    };
    parse(&file, &text).map_err(LoadError::Invalid)
}

/// The JSON Schema (draft 2020-12) of the file format, for editors such as
/// yaml-language-server.
#[cfg(feature = "schema")]
pub fn json_schema() -> serde_json::Value {
    let schema = schemars::schema_for!(raw::RawPipeline);
    schema.to_value()
}

/// The closest candidate to `input` by edit distance, if one is close enough to be a typo.
pub fn did_you_mean<'a>(
    input: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let max = (input.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (levenshtein(input, c), c))
        .filter(|(d, _)| *d <= max)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Optimal string alignment distance: edits, with a swap of two adjacent characters counting
/// as one.
fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j - 1] + cost)
                .min(rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
}
