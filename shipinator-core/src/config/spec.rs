//! The validated form of a `.shipinator.yaml`: what the engine executes. Built only by
//! [`parse`](super::parse) (or in code, by embedders) and never deserialized from YAML directly.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::{ArtifactType, JobType};

/// A validated pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineSpec {
    /// When runs are triggered (`on:`).
    pub triggers: Triggers,
    /// The build stage.
    pub build: Option<StageSpec>,
    /// The test stage.
    pub test: Option<StageSpec>,
    /// The deploy stage.
    pub deploy: Option<DeploySpec>,
}

impl PipelineSpec {
    /// The stages this spec defines, in execution order.
    pub fn stages(&self) -> Vec<JobType> {
        let mut out = Vec::with_capacity(3);
        if self.build.is_some() {
            out.push(JobType::Build);
        }
        if self.test.is_some() {
            out.push(JobType::Test);
        }
        if self.deploy.is_some() {
            out.push(JobType::Deploy);
        }
        out
    }

    /// The build or test stage.
    pub fn stage(&self, stage: JobType) -> Option<&StageSpec> {
        match stage {
            JobType::Build => self.build.as_ref(),
            JobType::Test => self.test.as_ref(),
            JobType::Deploy => None,
        }
    }
}

/// The `on:` section. With no `on:` section every trigger is enabled for every branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Triggers {
    /// Branch patterns pushes to which run the pipeline; `None` disables push runs.
    pub push: Option<Vec<String>>,
    /// Whether pull requests run the pipeline.
    pub pull_request: bool,
    /// Whether manual runs are allowed.
    pub manual: bool,
}

impl Default for Triggers {
    fn default() -> Self {
        Self {
            push: Some(vec!["*".to_owned()]),
            pull_request: true,
            manual: true,
        }
    }
}

/// A build or test stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageSpec {
    /// Default image for the stage's steps.
    pub image: Option<String>,
    /// Environment for every step of the stage (step `env` overrides it).
    pub env: BTreeMap<String, Template>,
    /// The steps, in order; never empty.
    pub steps: Vec<StepSpec>,
}

/// One step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSpec {
    /// Unique within the pipeline.
    pub name: String,
    /// Shell command, run with `sh -c`; contains no template.
    pub run: String,
    /// Image, overriding the stage's.
    pub image: Option<String>,
    /// Environment.
    pub env: BTreeMap<String, Template>,
    /// Wall-clock limit.
    pub timeout: Option<Duration>,
    /// Working directory relative to the workspace root.
    pub workdir: Option<String>,
    /// Declared outputs (`outputs:`) and test artifacts (`artifacts:`).
    pub outputs: Vec<OutputSpec>,
    /// Steps that share a group run concurrently. Consecutive `parallel: true` steps without an
    /// explicit group get a generated group name.
    pub parallel_group: Option<String>,
}

/// An output or artifact a step declares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputSpec {
    /// Type.
    pub artifact_type: ArtifactType,
    /// File path relative to the workspace (`path:`).
    pub path: Option<Template>,
    /// Image reference (`ref:`).
    pub image_ref: Option<Template>,
    /// Name for `deploy.artifact` to refer to.
    pub name: Option<String>,
}

/// Which artifact a deploy consumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", content = "value", rename_all = "snake_case")]
pub enum ArtifactSelector {
    /// The (last) build output of this type.
    Type(ArtifactType),
    /// The build output with this `name`.
    Output(String),
}

/// The deploy stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploySpec {
    /// What to deploy.
    pub artifact: ArtifactSelector,
    /// Deploy target name (`local` = the default configured Kubernetes target).
    pub target: String,
    /// Kubernetes namespace.
    pub namespace: Template,
    /// Helm release name.
    pub release: Option<Template>,
    /// Helm values (`--set key=value`).
    pub values: BTreeMap<String, Template>,
    /// Image running the deploy tooling.
    pub image: Option<String>,
    /// Branch patterns for which a push also deploys; empty = the repository's default branch.
    pub branches: Vec<String>,
    /// Wall-clock limit.
    pub timeout: Option<Duration>,
}

/// A variable usable in templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TemplateVar {
    /// `{{ .commit }}`: the full commit sha.
    Commit,
    /// `{{ .short_commit }}`: its first 12 characters.
    ShortCommit,
    /// `{{ .branch }}`: the branch name.
    Branch,
    /// `{{ .ref }}`: the git ref.
    Ref,
    /// `{{ .run_id }}`: the run id.
    RunId,
    /// `{{ .pipeline }}`: the pipeline name.
    Pipeline,
    /// `{{ .project }}`: the project name.
    Project,
}

impl TemplateVar {
    /// Every variable.
    pub const ALL: [TemplateVar; 7] = [
        TemplateVar::Commit,
        TemplateVar::ShortCommit,
        TemplateVar::Branch,
        TemplateVar::Ref,
        TemplateVar::RunId,
        TemplateVar::Pipeline,
        TemplateVar::Project,
    ];

    /// The name inside `{{ . }}`.
    pub const fn name(self) -> &'static str {
        match self {
            TemplateVar::Commit => "commit",
            TemplateVar::ShortCommit => "short_commit",
            TemplateVar::Branch => "branch",
            TemplateVar::Ref => "ref",
            TemplateVar::RunId => "run_id",
            TemplateVar::Pipeline => "pipeline",
            TemplateVar::Project => "project",
        }
    }

    /// The environment variable every command sees with the same value.
    pub const fn env_name(self) -> &'static str {
        match self {
            TemplateVar::Commit => "SHIPINATOR_COMMIT",
            TemplateVar::ShortCommit => "SHIPINATOR_SHORT_COMMIT",
            TemplateVar::Branch => "SHIPINATOR_BRANCH",
            TemplateVar::Ref => "SHIPINATOR_REF",
            TemplateVar::RunId => "SHIPINATOR_RUN_ID",
            TemplateVar::Pipeline => "SHIPINATOR_PIPELINE",
            TemplateVar::Project => "SHIPINATOR_PROJECT",
        }
    }

    /// Looks a variable up by name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }
}

/// The values templates are rendered with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateContext {
    /// Full commit sha.
    pub commit: String,
    /// Branch name.
    pub branch: String,
    /// Git ref.
    pub git_ref: String,
    /// Run id.
    pub run_id: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Project name.
    pub project: String,
}

impl TemplateContext {
    /// The value of one variable.
    pub fn value(&self, var: TemplateVar) -> &str {
        match var {
            TemplateVar::Commit => &self.commit,
            TemplateVar::ShortCommit => {
                let end = self
                    .commit
                    .char_indices()
                    .nth(12)
                    .map_or(self.commit.len(), |(i, _)| i);
                &self.commit[..end]
            }
            TemplateVar::Branch => &self.branch,
            TemplateVar::Ref => &self.git_ref,
            TemplateVar::RunId => &self.run_id,
            TemplateVar::Pipeline => &self.pipeline,
            TemplateVar::Project => &self.project,
        }
    }

    /// Every variable as `SHIPINATOR_*` environment entries.
    pub fn env(&self) -> impl Iterator<Item = (&'static str, &str)> {
        TemplateVar::ALL
            .into_iter()
            .map(|v| (v.env_name(), self.value(v)))
    }
}

/// A piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    /// Literal text.
    Text(String),
    /// A variable.
    Var(TemplateVar),
}

/// A string with `{{ .var }}` placeholders, checked when parsed.
#[derive(Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<TemplatePart>,
}

/// Why a template is invalid; `offset` is the byte offset in the template text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{{` without a matching `}}`.
    #[error("unclosed '{{{{' (add '}}}}')")]
    Unclosed {
        /// Byte offset of the `{{`.
        offset: usize,
    },
    /// `{{ x }}` where `x` does not start with a dot.
    #[error("expected a variable such as '{{{{ .commit }}}}', found '{{{{ {found} }}}}'")]
    Malformed {
        /// Byte offset of the `{{`.
        offset: usize,
        /// What was inside.
        found: String,
    },
    /// `{{ .x }}` where `x` is not a known variable.
    #[error(
        "unknown template variable '.{name}'{suggestion}; known: .commit, .short_commit, .branch, .ref, .run_id, .pipeline, .project"
    )]
    UnknownVar {
        /// Byte offset of the `{{`.
        offset: usize,
        /// The unknown name.
        name: String,
        /// `" (did you mean '.x'?)"` or empty.
        suggestion: String,
    },
}

impl TemplateError {
    /// Byte offset in the template text.
    pub fn offset(&self) -> usize {
        match self {
            TemplateError::Unclosed { offset }
            | TemplateError::Malformed { offset, .. }
            | TemplateError::UnknownVar { offset, .. } => *offset,
        }
    }
}

impl Template {
    /// Parses a template.
    ///
    /// # Errors
    /// Unclosed, malformed or unknown placeholders.
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = source;
        let mut base = 0;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(TemplatePart::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let Some(close) = after.find("}}") else {
                return Err(TemplateError::Unclosed {
                    offset: base + open,
                });
            };
            let inner = after[..close].trim();
            let Some(name) = inner.strip_prefix('.') else {
                return Err(TemplateError::Malformed {
                    offset: base + open,
                    found: inner.to_owned(),
                });
            };
            let Some(var) = TemplateVar::from_name(name) else {
                let suggestion =
                    crate::config::did_you_mean(name, TemplateVar::ALL.iter().map(|v| v.name()))
                        .map(|s| format!(" (did you mean '.{s}'?)"))
                        .unwrap_or_default();
                return Err(TemplateError::UnknownVar {
                    offset: base + open,
                    name: name.to_owned(),
                    suggestion,
                });
            };
            parts.push(TemplatePart::Var(var));
            let consumed = open + 2 + close + 2;
            base += consumed;
            rest = &rest[consumed..];
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Text(rest.to_owned()));
        }
        Ok(Self {
            source: source.to_owned(),
            parts,
        })
    }

    /// A template with no placeholders (any `{{` is taken literally).
    pub fn literal(text: &str) -> Self {
        Self {
            source: text.to_owned(),
            parts: vec![TemplatePart::Text(text.to_owned())],
        }
    }

    /// The text as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The parsed pieces.
    pub fn parts(&self) -> &[TemplatePart] {
        &self.parts
    }

    /// Renders with `ctx`.
    pub fn render(&self, ctx: &TemplateContext) -> String {
        let mut out = String::with_capacity(self.source.len() + 32);
        for part in &self.parts {
            match part {
                TemplatePart::Text(t) => out.push_str(t),
                TemplatePart::Var(v) => out.push_str(ctx.value(*v)),
            }
        }
        out
    }
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Template({:?})", self.source)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Serialize for Template {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Template {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Template::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_variables() {
        let t = Template::parse("myapp:{{ .short_commit }}-{{.branch}}").unwrap();
        let ctx = TemplateContext {
            commit: "0123456789abcdef0123".into(),
            branch: "main".into(),
            ..TemplateContext::default()
        };
        assert_eq!(t.render(&ctx), "myapp:0123456789ab-main");
    }

    #[test]
    fn rejects_bad_templates() {
        assert!(matches!(
            Template::parse("a {{ .commit"),
            Err(TemplateError::Unclosed { offset: 2 })
        ));
        assert!(matches!(
            Template::parse("{{ commit }}"),
            Err(TemplateError::Malformed { .. })
        ));
        let err = Template::parse("x{{ .comit }}").unwrap_err();
        assert_eq!(err.offset(), 1);
        assert!(err.to_string().contains("did you mean '.commit'?"), "{err}");
    }
}
