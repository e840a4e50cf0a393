//! Raw types mirroring `.shipinator.yaml` key for key, every value with its location.
//!
//! [`parse`](super::parse) builds them from a located YAML tree (so that every unknown key and
//! wrong type is reported, not only the first), then validates them into a
//! [`PipelineSpec`](super::PipelineSpec). They also derive `Deserialize` (rejecting unknown keys)
//! for callers that want the file as written, and, with the `schema` feature, `JsonSchema`:
//! [`json_schema`](super::json_schema) is generated from them.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer};

/// A value and its 1-based position in the file.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Located<T> {
    /// The value.
    pub value: T,
    /// 1-based line.
    pub line: u64,
    /// 1-based column, in characters.
    pub column: u64,
}

impl<T> Located<T> {
    /// Pairs `value` with a position.
    pub fn new(value: T, line: u64, column: u64) -> Self {
        Self {
            value,
            line,
            column,
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Located<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}@{}:{}", self.value, self.line, self.column)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Located<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = serde_saphyr::Spanned::<T>::deserialize(d)?;
        Ok(Self::new(
            s.value,
            s.referenced.line(),
            s.referenced.column(),
        ))
    }
}

#[cfg(feature = "schema")]
impl<T: schemars::JsonSchema> schemars::JsonSchema for Located<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        T::schema_name()
    }

    fn schema_id() -> std::borrow::Cow<'static, str> {
        T::schema_id()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        T::json_schema(generator)
    }
}

/// A string-valued mapping such as `env:` or `values:`; numbers and booleans are kept as
/// written.
pub type RawStringMap = BTreeMap<Located<String>, Located<String>>;

/// A string; numbers and booleans are taken as written.
#[cfg(feature = "schema")]
#[derive(schemars::JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum ScalarValue {
    String(String),
    Number(f64),
    Bool(bool),
}

#[cfg(feature = "schema")]
type SchemaStringMap = BTreeMap<String, ScalarValue>;

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "schema",
    schemars(title = "Shipinator pipeline (.shipinator.yaml)")
)]
#[serde(deny_unknown_fields)]
pub struct RawPipeline {
    /// When runs are triggered. Without it, pushes to any branch, pull requests and manual
    /// runs all run the pipeline.
    #[serde(default)]
    pub on: Option<Located<RawTriggers>>,
    /// Steps that produce artifacts.
    #[serde(default)]
    pub build: Option<Located<RawStage>>,
    /// Steps that test; may run concurrently.
    #[serde(default)]
    pub test: Option<Located<RawStage>>,
    /// Deploys one build output.
    #[serde(default)]
    pub deploy: Option<Located<RawDeploy>>,
}

/// `on:`. When present, only the listed triggers run the pipeline (manual runs stay allowed
/// unless `manual: false`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawTriggers {
    /// Pushes run the pipeline; `push: {}` or `push:` alone means every branch.
    #[serde(default, deserialize_with = "present")]
    pub push: Option<Located<Option<RawPush>>>,
    /// Pull requests run the pipeline.
    #[serde(default)]
    pub pull_request: Option<Located<bool>>,
    /// Manual runs are allowed (default `true`).
    #[serde(default)]
    pub manual: Option<Located<bool>>,
}

/// A key that is present, even with a null value, is `Some`.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// `on.push`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawPush {
    /// Branch patterns (`*` matches any run of characters); default: every branch.
    #[serde(default)]
    pub branches: Option<Vec<Located<String>>>,
}

/// `build:` or `test:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawStage {
    /// Default image for the steps.
    #[serde(default)]
    pub image: Option<Located<String>>,
    /// Environment for every step; values may use templates.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<SchemaStringMap>"))]
    pub env: Option<RawStringMap>,
    /// The steps, in order.
    #[cfg_attr(feature = "schema", schemars(with = "Vec<RawStep>", length(min = 1)))]
    pub steps: Option<Vec<Located<RawStep>>>,
}

/// One step. `artifacts`, `parallel` and `parallel_group` are accepted in the test stage only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawStep {
    /// Unique name.
    #[cfg_attr(feature = "schema", schemars(with = "String"))]
    pub name: Option<Located<String>>,
    /// Shell command (`sh -c`). Templates are not expanded here: use the `SHIPINATOR_*`
    /// environment variables.
    #[cfg_attr(feature = "schema", schemars(with = "String"))]
    pub run: Option<Located<String>>,
    /// Image, overriding the stage's.
    #[serde(default)]
    pub image: Option<Located<String>>,
    /// Environment; values may use templates.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<SchemaStringMap>"))]
    pub env: Option<RawStringMap>,
    /// Wall-clock limit such as `30s`, `5m` or `1h30m`.
    #[serde(default)]
    pub timeout: Option<Located<String>>,
    /// Working directory relative to the workspace root.
    #[serde(default)]
    pub workdir: Option<Located<String>>,
    /// Outputs the step produces.
    #[serde(default)]
    pub outputs: Option<Vec<Located<RawOutput>>>,
    /// Test artifacts (reports, coverage); test stage only.
    #[serde(default)]
    pub artifacts: Option<Vec<Located<RawOutput>>>,
    /// Runs concurrently with adjacent `parallel: true` steps; test stage only.
    #[serde(default)]
    pub parallel: Option<Located<bool>>,
    /// Runs concurrently with the (adjacent) steps of the same group; test stage only.
    #[serde(default)]
    pub parallel_group: Option<Located<String>>,
}

/// An entry of `outputs:` or `artifacts:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawOutput {
    /// Artifact type.
    #[serde(rename = "type")]
    #[cfg_attr(feature = "schema", schemars(with = "ArtifactTypeName"))]
    pub artifact_type: Option<Located<String>>,
    /// File path (files).
    #[serde(default)]
    pub path: Option<Located<String>>,
    /// Image reference (`oci_image`).
    #[serde(default, rename = "ref")]
    pub image_ref: Option<Located<String>>,
    /// Name for `deploy.artifact` to refer to.
    #[serde(default)]
    pub name: Option<Located<String>>,
}

/// An artifact type.
#[cfg(feature = "schema")]
#[derive(schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum ArtifactTypeName {
    Binary,
    OciImage,
    HelmChart,
    K8sManifest,
    TestReport,
    Coverage,
    File,
}

/// `deploy:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawDeploy {
    /// An artifact type a build output has, or a build output's `name`.
    #[cfg_attr(feature = "schema", schemars(with = "String"))]
    pub artifact: Option<Located<String>>,
    /// Deploy target (`local` = the default configured Kubernetes target).
    #[cfg_attr(feature = "schema", schemars(with = "String"))]
    pub target: Option<Located<String>>,
    /// Kubernetes namespace.
    #[cfg_attr(feature = "schema", schemars(with = "String"))]
    pub namespace: Option<Located<String>>,
    /// Helm release name.
    #[serde(default)]
    pub release: Option<Located<String>>,
    /// Helm values (`--set key=value`).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<SchemaStringMap>"))]
    pub values: Option<RawStringMap>,
    /// Image running the deploy tooling.
    #[serde(default)]
    pub image: Option<Located<String>>,
    /// Branch patterns for which a push also deploys; default: the default branch.
    #[serde(default)]
    pub branches: Option<Vec<Located<String>>>,
    /// Wall-clock limit such as `10m`.
    #[serde(default)]
    pub timeout: Option<Located<String>>,
}
