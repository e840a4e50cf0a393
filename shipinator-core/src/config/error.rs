//! Located configuration errors.

use std::fmt;
use std::path::PathBuf;

/// What kind of problem a [`ConfigError`] reports. The [`as_str`](Self::as_str) text is
/// stable: scripts match on it (`shipinator validate --output json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ConfigErrorCode {
    /// The text is not valid YAML.
    YamlSyntax,
    /// The file is larger than [`MAX_FILE_BYTES`](super::MAX_FILE_BYTES).
    FileTooLarge,
    /// The YAML exceeds a parse budget: nesting depth, aliases or node count.
    YamlTooComplex,
    /// The file defines no stage.
    EmptyFile,
    /// A key the format does not know.
    UnknownKey,
    /// A mapping key appears twice.
    DuplicateKey,
    /// A required key is missing.
    MissingKey,
    /// A value has the wrong YAML type (e.g. a list where a string is expected).
    WrongType,
    /// A value is of the right type but not allowed (e.g. an empty name).
    InvalidValue,
    /// A stage has no steps.
    EmptyStage,
    /// Two steps share a name.
    DuplicateStep,
    /// An output or artifact `type` that does not exist.
    UnknownArtifactType,
    /// A malformed `{{ ... }}` template or an unknown template variable.
    InvalidTemplate,
    /// A template inside `run`, where environment variables must be used instead.
    TemplateInRun,
    /// A malformed, zero or absurd duration.
    InvalidDuration,
    /// `deploy.artifact` names nothing the build stage produces.
    UnresolvedArtifact,
}

impl ConfigErrorCode {
    /// Every code.
    pub const ALL: [ConfigErrorCode; 16] = [
        ConfigErrorCode::YamlSyntax,
        ConfigErrorCode::FileTooLarge,
        ConfigErrorCode::YamlTooComplex,
        ConfigErrorCode::EmptyFile,
        ConfigErrorCode::UnknownKey,
        ConfigErrorCode::DuplicateKey,
        ConfigErrorCode::MissingKey,
        ConfigErrorCode::WrongType,
        ConfigErrorCode::InvalidValue,
        ConfigErrorCode::EmptyStage,
        ConfigErrorCode::DuplicateStep,
        ConfigErrorCode::UnknownArtifactType,
        ConfigErrorCode::InvalidTemplate,
        ConfigErrorCode::TemplateInRun,
        ConfigErrorCode::InvalidDuration,
        ConfigErrorCode::UnresolvedArtifact,
    ];

    /// The stable snake_case text.
    pub const fn as_str(self) -> &'static str {
        match self {
            ConfigErrorCode::YamlSyntax => "yaml_syntax",
            ConfigErrorCode::FileTooLarge => "file_too_large",
            ConfigErrorCode::YamlTooComplex => "yaml_too_complex",
            ConfigErrorCode::EmptyFile => "empty_file",
            ConfigErrorCode::UnknownKey => "unknown_key",
            ConfigErrorCode::DuplicateKey => "duplicate_key",
            ConfigErrorCode::MissingKey => "missing_key",
            ConfigErrorCode::WrongType => "wrong_type",
            ConfigErrorCode::InvalidValue => "invalid_value",
            ConfigErrorCode::EmptyStage => "empty_stage",
            ConfigErrorCode::DuplicateStep => "duplicate_step",
            ConfigErrorCode::UnknownArtifactType => "unknown_artifact_type",
            ConfigErrorCode::InvalidTemplate => "invalid_template",
            ConfigErrorCode::TemplateInRun => "template_in_run",
            ConfigErrorCode::InvalidDuration => "invalid_duration",
            ConfigErrorCode::UnresolvedArtifact => "unresolved_artifact",
        }
    }
}

impl fmt::Display for ConfigErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One problem in a configuration file, with its location. Lines and columns are 1-based;
/// columns count characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message} [{code}]")]
pub struct ConfigError {
    /// The file name as given to [`parse`](super::parse).
    pub file: String,
    /// 1-based line.
    pub line: u64,
    /// 1-based column (in characters).
    pub column: u64,
    /// What kind of problem.
    pub code: ConfigErrorCode,
    /// Lowercase, actionable description.
    pub message: String,
}

/// Every problem found in one file; never empty. `Display` shows them all, one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    errors: Vec<ConfigError>,
}

impl ConfigErrors {
    /// Wraps a list sorted by position; `None` when it is empty.
    pub fn new(mut errors: Vec<ConfigError>) -> Option<Self> {
        if errors.is_empty() {
            return None;
        }
        errors.sort_by_key(|e| (e.line, e.column));
        Some(Self { errors })
    }

    /// A single error.
    pub fn one(error: ConfigError) -> Self {
        Self {
            errors: vec![error],
        }
    }

    /// The errors, ordered by position.
    pub fn errors(&self) -> &[ConfigError] {
        &self.errors
    }

    /// The errors, ordered by position.
    pub fn into_vec(self) -> Vec<ConfigError> {
        self.errors
    }

    /// Number of errors (at least one).
    pub fn len(&self) -> usize {
        self.errors.len()
    }

    /// Always `false`; present for API symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.errors.into_iter()
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.errors.iter()
    }
}

/// Why [`load`](super::load) failed: the file could not be read, or it is invalid.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Reading the file failed.
    #[error("cannot read {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is invalid.
    #[error("{0}")]
    Invalid(ConfigErrors),
}
