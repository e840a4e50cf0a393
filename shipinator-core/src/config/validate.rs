//! The two passes after YAML parsing: located tree → raw types (keys and shapes), then raw
//! types → [`PipelineSpec`] (meaning). Both collect every error instead of stopping.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use super::error::{ConfigError, ConfigErrorCode as Code};
use super::node::{Kind, Node, Pos};
use super::raw::{
    Located, RawDeploy, RawOutput, RawPipeline, RawPush, RawStage, RawStep, RawStringMap,
    RawTriggers,
};
use super::{
    ArtifactSelector, DeploySpec, OutputSpec, PipelineSpec, StageSpec, StepSpec, Template,
    TemplateVar, Triggers, did_you_mean,
};
use crate::domain::ArtifactType;

/// Longest accepted duration (7 days).
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Collects errors for one file.
pub(crate) struct Cx<'a> {
    file: &'a str,
    src: &'a str,
    errors: Vec<ConfigError>,
    /// `(mapping position, key)` already reported as misspelt or ill-typed: no "missing key"
    /// error follows for them.
    accounted: BTreeSet<(Pos, &'static str)>,
}

impl<'a> Cx<'a> {
    pub(crate) fn new(file: &'a str, src: &'a str) -> Self {
        Self {
            file,
            src,
            errors: Vec::new(),
            accounted: BTreeSet::new(),
        }
    }

    pub(crate) fn into_errors(self) -> Vec<ConfigError> {
        self.errors
    }

    pub(crate) fn err(&mut self, pos: Pos, code: Code, message: String) {
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            line: pos.line,
            column: pos.column,
            code,
            message,
        });
    }

    fn err_at<T>(&mut self, at: &Located<T>, code: Code, message: String) {
        self.err(pos_of(at), code, message);
    }
}

fn pos_of<T>(l: &Located<T>) -> Pos {
    Pos {
        line: l.line,
        column: l.column,
    }
}

fn located<T>(value: T, pos: Pos) -> Located<T> {
    Located::new(value, pos.line, pos.column)
}

fn suggestion<'c>(input: &str, candidates: impl IntoIterator<Item = &'c str>) -> String {
    did_you_mean(input, candidates)
        .map(|s| format!(" (did you mean '{s}'?)"))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Pass 1: tree → raw.
// ---------------------------------------------------------------------------------------------

const TOP_KEYS: &[&str] = &["on", "build", "test", "deploy"];
const TRIGGER_KEYS: &[&str] = &["push", "pull_request", "manual"];
const PUSH_KEYS: &[&str] = &["branches"];
const STAGE_KEYS: &[&str] = &["image", "env", "steps"];
const STEP_KEYS: &[&str] = &[
    "name",
    "run",
    "image",
    "env",
    "timeout",
    "workdir",
    "outputs",
    "artifacts",
    "parallel",
    "parallel_group",
];
const OUTPUT_KEYS: &[&str] = &["type", "path", "ref", "name"];
const DEPLOY_KEYS: &[&str] = &[
    "artifact",
    "target",
    "namespace",
    "release",
    "values",
    "image",
    "branches",
    "timeout",
];

/// The known keys of one mapping, each with its value node.
struct Fields<'n> {
    pos: Pos,
    found: Vec<(&'static str, &'n Node)>,
}

impl<'n> Fields<'n> {
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.found.iter().find(|(k, _)| *k == key).map(|(_, n)| *n)
    }
}

impl Cx<'_> {
    fn wrong_type(&mut self, node: &Node, path: &str, expected: &str) {
        self.err(
            node.pos,
            Code::WrongType,
            format!(
                "`{path}` must be {expected}, found {}",
                node.kind.describe()
            ),
        );
    }

    /// Checks a mapping's keys: reports unknown (with did-you-mean), duplicate and non-string
    /// keys; returns the known ones. `None` (after an error) when `node` is not a mapping.
    fn fields<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        known: &'static [&'static str],
    ) -> Option<Fields<'n>> {
        let Kind::Map(entries) = &node.kind else {
            self.wrong_type(node, path, "a mapping");
            return None;
        };
        let mut found: Vec<(&'static str, &'n Node)> = Vec::new();
        for (key, value) in entries {
            let Kind::Str(name) = &key.kind else {
                self.err(
                    key.pos,
                    Code::WrongType,
                    format!(
                        "keys of `{path}` must be strings, found {}",
                        key.kind.describe()
                    ),
                );
                continue;
            };
            match known.iter().find(|k| **k == name.as_str()) {
                Some(k) if found.iter().any(|(f, _)| f == k) => self.err(
                    key.pos,
                    Code::DuplicateKey,
                    format!("duplicate key '{name}' in `{path}`: remove one of them"),
                ),
                Some(k) => found.push((k, value)),
                None => {
                    if let Some(meant) = did_you_mean(name, known.iter().copied()) {
                        self.accounted.insert((node.pos, meant));
                    }
                    let hint = suggestion(name, known.iter().copied());
                    let hint = if hint.is_empty() {
                        format!("; known keys: {}", known.join(", "))
                    } else {
                        hint
                    };
                    self.err(
                        key.pos,
                        Code::UnknownKey,
                        format!("unknown key '{name}' in `{path}`{hint}"),
                    );
                }
            }
        }
        Some(Fields {
            pos: node.pos,
            found,
        })
    }

    /// A string scalar; numbers and booleans are taken as written.
    fn string(&mut self, node: &Node, path: &str) -> Option<Located<String>> {
        let text = match &node.kind {
            Kind::Str(s) => s.clone(),
            Kind::Number(n) => self.source_text(node).unwrap_or(n).to_owned(),
            Kind::Bool(b) => self
                .source_text(node)
                .map_or_else(|| b.to_string(), str::to_owned),
            Kind::Null | Kind::Seq(_) | Kind::Map(_) => {
                self.wrong_type(node, path, "a string");
                return None;
            }
        };
        Some(located(text, node.pos))
    }

    /// The source text of a plain scalar, when it can be recovered exactly.
    fn source_text(&self, node: &Node) -> Option<&str> {
        let (start, len) = node.span?;
        let text = self.src.get(start..start.checked_add(len)?)?.trim();
        (!text.is_empty() && !text.contains(['\n', '#', '"', '\''])).then_some(text)
    }

    fn boolean(&mut self, node: &Node, path: &str) -> Option<Located<bool>> {
        if let Kind::Bool(b) = node.kind {
            Some(located(b, node.pos))
        } else {
            self.wrong_type(node, path, "`true` or `false`");
            None
        }
    }

    fn list<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n [Node]> {
        if let Kind::Seq(items) = &node.kind {
            Some(items)
        } else {
            self.wrong_type(node, path, "a list");
            None
        }
    }

    fn strings(&mut self, node: &Node, path: &str) -> Option<Vec<Located<String>>> {
        let items = self.list(node, path)?;
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            if let Some(s) = self.string(item, &format!("{path}[{i}]")) {
                out.push(s);
            }
        }
        Some(out)
    }

    fn string_map(&mut self, node: &Node, path: &str) -> Option<RawStringMap> {
        let Kind::Map(entries) = &node.kind else {
            self.wrong_type(node, path, "a mapping of names to strings");
            return None;
        };
        let mut out = RawStringMap::new();
        for (key, value) in entries {
            let Some(k) = self.string(key, &format!("{path} key")) else {
                continue;
            };
            let Some(v) = self.string(value, &format!("{path}.{}", k.value)) else {
                continue;
            };
            if out.contains_key(&k) || out.keys().any(|e| e.value == k.value) {
                self.err_at(
                    &k,
                    Code::DuplicateKey,
                    format!(
                        "duplicate key '{}' in `{path}`: remove one of them",
                        k.value
                    ),
                );
                continue;
            }
            out.insert(k, v);
        }
        Some(out)
    }

    /// Converts the value of `key` if present; a present but invalid value is accounted for.
    fn opt<T>(
        &mut self,
        f: &Fields<'_>,
        key: &'static str,
        convert: impl FnOnce(&mut Self, &Node) -> Option<T>,
    ) -> Option<T> {
        let node = f.get(key)?;
        let out = convert(self, node);
        if out.is_none() {
            self.accounted.insert((f.pos, key));
        }
        out
    }

    fn opt_string(
        &mut self,
        f: &Fields<'_>,
        key: &'static str,
        path: &str,
    ) -> Option<Located<String>> {
        self.opt(f, key, |cx, n| cx.string(n, &format!("{path}.{key}")))
    }

    fn opt_bool(&mut self, f: &Fields<'_>, key: &'static str, path: &str) -> Option<Located<bool>> {
        self.opt(f, key, |cx, n| cx.boolean(n, &format!("{path}.{key}")))
    }

    fn opt_map(&mut self, f: &Fields<'_>, key: &'static str, path: &str) -> Option<RawStringMap> {
        self.opt(f, key, |cx, n| cx.string_map(n, &format!("{path}.{key}")))
    }

    fn opt_strings(
        &mut self,
        f: &Fields<'_>,
        key: &'static str,
        path: &str,
    ) -> Option<Vec<Located<String>>> {
        self.opt(f, key, |cx, n| cx.strings(n, &format!("{path}.{key}")))
    }

    /// Whether a problem with `key` of the mapping at `at` was already reported.
    fn accounted<T>(&self, at: &Located<T>, key: &'static str) -> bool {
        self.accounted.contains(&(pos_of(at), key))
    }

    /// Pass 1: the tree of a whole file into raw types.
    pub(crate) fn raw_pipeline(&mut self, root: &Node) -> RawPipeline {
        let mut raw = RawPipeline::default();
        let Some(f) = self.fields(root, "the top level", TOP_KEYS) else {
            return raw;
        };
        raw.on = f.get("on").and_then(|n| self.raw_triggers(n));
        raw.build = f.get("build").and_then(|n| self.raw_stage(n, "build"));
        raw.test = f.get("test").and_then(|n| self.raw_stage(n, "test"));
        raw.deploy = f.get("deploy").and_then(|n| self.raw_deploy(n));
        raw
    }

    fn raw_triggers(&mut self, node: &Node) -> Option<Located<RawTriggers>> {
        let f = self.fields(node, "on", TRIGGER_KEYS)?;
        let push = f.get("push").and_then(|n| {
            if n.kind == Kind::Null {
                return Some(located(None, n.pos));
            }
            if !matches!(n.kind, Kind::Map(_)) {
                self.wrong_type(n, "on.push", "a mapping such as `{ branches: [main] }`");
                return None;
            }
            let pf = self.fields(n, "on.push", PUSH_KEYS)?;
            let branches = self.opt_strings(&pf, "branches", "on.push");
            Some(located(Some(RawPush { branches }), n.pos))
        });
        let raw = RawTriggers {
            push,
            pull_request: self.opt_bool(&f, "pull_request", "on"),
            manual: self.opt_bool(&f, "manual", "on"),
        };
        Some(located(raw, node.pos))
    }

    fn raw_stage(&mut self, node: &Node, name: &str) -> Option<Located<RawStage>> {
        if node.kind == Kind::Null {
            return Some(located(RawStage::default(), node.pos));
        }
        let f = self.fields(node, name, STAGE_KEYS)?;
        let mut raw = RawStage {
            image: self.opt_string(&f, "image", name),
            env: self.opt_map(&f, "env", name),
            steps: None,
        };
        raw.steps = self.opt(&f, "steps", |cx, steps| {
            let path = format!("{name}.steps");
            if steps.kind == Kind::Null {
                return Some(Vec::new());
            }
            let items = cx.list(steps, &path)?;
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                if let Some(step) = cx.raw_step(item, &format!("{path}[{i}]")) {
                    out.push(step);
                }
            }
            Some(out)
        });
        Some(located(raw, node.pos))
    }

    fn raw_step(&mut self, node: &Node, path: &str) -> Option<Located<RawStep>> {
        let f = self.fields(node, path, STEP_KEYS)?;
        let raw = RawStep {
            name: self.opt_string(&f, "name", path),
            run: self.opt_string(&f, "run", path),
            image: self.opt_string(&f, "image", path),
            env: self.opt_map(&f, "env", path),
            timeout: self.opt_string(&f, "timeout", path),
            workdir: self.opt_string(&f, "workdir", path),
            outputs: self.opt(&f, "outputs", |cx, n| {
                cx.raw_outputs(n, &format!("{path}.outputs"))
            }),
            artifacts: self.opt(&f, "artifacts", |cx, n| {
                cx.raw_outputs(n, &format!("{path}.artifacts"))
            }),
            parallel: self.opt_bool(&f, "parallel", path),
            parallel_group: self.opt_string(&f, "parallel_group", path),
        };
        Some(located(raw, node.pos))
    }

    fn raw_outputs(&mut self, node: &Node, path: &str) -> Option<Vec<Located<RawOutput>>> {
        let items = self.list(node, path)?;
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let Some(f) = self.fields(item, &p, OUTPUT_KEYS) else {
                continue;
            };
            let raw = RawOutput {
                artifact_type: self.opt_string(&f, "type", &p),
                path: self.opt_string(&f, "path", &p),
                image_ref: self.opt_string(&f, "ref", &p),
                name: self.opt_string(&f, "name", &p),
            };
            out.push(located(raw, item.pos));
        }
        Some(out)
    }

    fn raw_deploy(&mut self, node: &Node) -> Option<Located<RawDeploy>> {
        let p = "deploy";
        let f = self.fields(node, p, DEPLOY_KEYS)?;
        let raw = RawDeploy {
            artifact: self.opt_string(&f, "artifact", p),
            target: self.opt_string(&f, "target", p),
            namespace: self.opt_string(&f, "namespace", p),
            release: self.opt_string(&f, "release", p),
            values: self.opt_map(&f, "values", p),
            image: self.opt_string(&f, "image", p),
            branches: self.opt_strings(&f, "branches", p),
            timeout: self.opt_string(&f, "timeout", p),
        };
        Some(located(raw, node.pos))
    }
}

// ---------------------------------------------------------------------------------------------
// Pass 2: raw → spec.
// ---------------------------------------------------------------------------------------------

/// A build output, for resolving `deploy.artifact`.
struct Produced {
    artifact_type: ArtifactType,
    name: Option<String>,
}

impl Cx<'_> {
    /// Pass 2. Returns a spec only when no error at all was found (in either pass).
    pub(crate) fn spec(&mut self, raw: &RawPipeline, top: Pos) -> Option<PipelineSpec> {
        if raw.build.is_none()
            && raw.test.is_none()
            && raw.deploy.is_none()
            && self.errors.is_empty()
        {
            self.err(
                top,
                Code::EmptyFile,
                "the file defines no stage: add a `build`, `test` or `deploy` section (see `shipinator schema`)"
                    .to_owned(),
            );
        }
        let triggers = raw
            .on
            .as_ref()
            .map_or_else(Triggers::default, |on| self.triggers(on));
        let mut step_names: HashMap<String, Pos> = HashMap::new();
        let mut output_names: HashMap<String, Pos> = HashMap::new();
        let mut produced = Vec::new();
        let build = raw.build.as_ref().map(|s| {
            self.stage(
                s,
                "build",
                &mut step_names,
                &mut output_names,
                &mut produced,
            )
        });
        let mut ignored = Vec::new();
        let test = raw
            .test
            .as_ref()
            .map(|s| self.stage(s, "test", &mut step_names, &mut output_names, &mut ignored));
        let deploy = raw.deploy.as_ref().map(|d| self.deploy(d, &produced));
        if !self.errors.is_empty() {
            return None;
        }
        Some(PipelineSpec {
            triggers,
            build,
            test,
            deploy: deploy.flatten(),
        })
    }

    fn triggers(&mut self, on: &Located<RawTriggers>) -> Triggers {
        let push = on.value.push.as_ref().map(|p| match &p.value {
            Some(RawPush {
                branches: Some(b), ..
            }) => {
                if b.is_empty() {
                    self.err_at(
                        p,
                        Code::InvalidValue,
                        "`on.push.branches` is empty: list branch patterns, or remove `branches` to run on every branch".to_owned(),
                    );
                }
                self.patterns(b, "on.push.branches")
            }
            _ => vec!["*".to_owned()],
        });
        Triggers {
            push,
            pull_request: on.value.pull_request.as_ref().is_some_and(|b| b.value),
            manual: on.value.manual.as_ref().is_none_or(|b| b.value),
        }
    }

    fn patterns(&mut self, list: &[Located<String>], path: &str) -> Vec<String> {
        let mut out = Vec::with_capacity(list.len());
        for p in list {
            let v = p.value.trim();
            if v.is_empty() {
                self.err_at(
                    p,
                    Code::InvalidValue,
                    format!("empty branch pattern in `{path}`: use a name such as 'main' or a pattern such as 'release/*'"),
                );
            } else {
                out.push(v.to_owned());
            }
        }
        out
    }

    fn stage(
        &mut self,
        stage: &Located<RawStage>,
        name: &str,
        step_names: &mut HashMap<String, Pos>,
        output_names: &mut HashMap<String, Pos>,
        produced: &mut Vec<Produced>,
    ) -> StageSpec {
        let raw = &stage.value;
        let image = self.image(raw.image.as_ref(), name);
        let env = self.env(raw.env.as_ref(), &format!("{name}.env"));
        let steps = raw.steps.as_deref().unwrap_or_default();
        if steps.is_empty() && !self.accounted(stage, "steps") {
            self.err_at(
                stage,
                Code::EmptyStage,
                format!(
                    "stage `{name}` has no steps: add at least one step with `name` and `run`, or remove the stage"
                ),
            );
        }
        let mut specs = Vec::with_capacity(steps.len());
        for (i, step) in steps.iter().enumerate() {
            let path = format!("{name}.steps[{i}]");
            specs.push(self.step(step, name, &path, step_names, output_names, produced));
        }
        self.parallel_groups(name, steps, &mut specs);
        StageSpec {
            image,
            env,
            steps: specs,
        }
    }

    fn image(&mut self, image: Option<&Located<String>>, path: &str) -> Option<String> {
        let image = image?;
        let v = image.value.trim();
        if v.is_empty() || v.contains(char::is_whitespace) {
            self.err_at(
                image,
                Code::InvalidValue,
                format!(
                    "`{path}.image` must be an image reference such as 'alpine:3.20', found '{}'",
                    image.value
                ),
            );
            return None;
        }
        Some(v.to_owned())
    }

    fn step(
        &mut self,
        step: &Located<RawStep>,
        stage: &str,
        path: &str,
        step_names: &mut HashMap<String, Pos>,
        output_names: &mut HashMap<String, Pos>,
        produced: &mut Vec<Produced>,
    ) -> StepSpec {
        let raw = &step.value;
        let name = match &raw.name {
            None if self.accounted(step, "name") => String::new(),
            None => {
                self.err_at(
                    step,
                    Code::MissingKey,
                    format!("`{path}` has no `name`: add `name: <unique step name>`"),
                );
                String::new()
            }
            Some(n) if n.value.trim().is_empty() => {
                self.err_at(n, Code::InvalidValue, format!("`{path}.name` is empty"));
                String::new()
            }
            Some(n) => {
                let v = n.value.trim().to_owned();
                if let Some(first) = step_names.get(&v) {
                    self.err_at(
                        n,
                        Code::DuplicateStep,
                        format!(
                            "duplicate step name '{v}' (first used on line {}): step names must be unique in the pipeline",
                            first.line
                        ),
                    );
                } else {
                    step_names.insert(v.clone(), pos_of(n));
                }
                v
            }
        };
        let label = if name.is_empty() {
            path.to_owned()
        } else {
            format!("{path} ('{name}')")
        };
        let run = match &raw.run {
            None if self.accounted(step, "run") => String::new(),
            None => {
                self.err_at(
                    step,
                    Code::MissingKey,
                    format!("step {label} has no `run`: add `run: <shell command>`"),
                );
                String::new()
            }
            Some(r) if r.value.trim().is_empty() => {
                self.err_at(
                    r,
                    Code::InvalidValue,
                    format!("`run` of step {label} is empty"),
                );
                String::new()
            }
            Some(r) => {
                self.check_run(r, &label);
                r.value.clone()
            }
        };
        let image = self.image(raw.image.as_ref(), path);
        let env = self.env(raw.env.as_ref(), &format!("{path}.env"));
        let timeout = raw
            .timeout
            .as_ref()
            .and_then(|t| self.duration(t, &format!("{path}.timeout")));
        let workdir = raw.workdir.as_ref().and_then(|w| self.workdir(w, path));
        let mut outputs = Vec::new();
        for (key, list) in [("outputs", &raw.outputs), ("artifacts", &raw.artifacts)] {
            let Some(list) = list else { continue };
            if key == "artifacts" && stage != "test" {
                if let Some(first) = list.first() {
                    self.err_at(
                        first,
                        Code::InvalidValue,
                        format!("`{path}.artifacts` is only for test steps: use `outputs` in the {stage} stage"),
                    );
                }
                continue;
            }
            for (i, out) in list.iter().enumerate() {
                let opath = format!("{path}.{key}[{i}]");
                if let Some(spec) = self.output(out, &opath, output_names) {
                    produced.push(Produced {
                        artifact_type: spec.artifact_type,
                        name: spec.name.clone(),
                    });
                    outputs.push(spec);
                }
            }
        }
        if stage != "test" {
            for (key, present) in [
                ("parallel", raw.parallel.as_ref().map(pos_of)),
                ("parallel_group", raw.parallel_group.as_ref().map(pos_of)),
            ] {
                if let Some(pos) = present {
                    self.err(
                        pos,
                        Code::InvalidValue,
                        format!("`{path}.{key}` is only available in the test stage: {stage} steps run one after another"),
                    );
                }
            }
        }
        StepSpec {
            name,
            run,
            image,
            env,
            timeout,
            workdir,
            outputs,
            parallel_group: None,
        }
    }

    /// Rejects `{{ .var }}` in `run`, naming the environment variable to use instead.
    fn check_run(&mut self, run: &Located<String>, label: &str) {
        let text = &run.value;
        let mut from = 0;
        while let Some(open) = text[from..].find("{{").map(|o| o + from) {
            let after = open + 2;
            let Some(close) = text[after..].find("}}").map(|c| c + after) else {
                break;
            };
            let inner = text[after..close].trim();
            if let Some(var) = inner.strip_prefix('.').and_then(TemplateVar::from_name) {
                let pos = self.pos_in_scalar(run, open);
                self.err(
                    pos,
                    Code::TemplateInRun,
                    format!(
                        "templates are not expanded in `run` of step {label}: use the environment variable ${} instead of '{}'",
                        var.env_name(),
                        &text[open..close + 2]
                    ),
                );
            }
            from = close + 2;
        }
    }

    /// The position of byte `offset` of a scalar's value, when the value is written on one line
    /// exactly as parsed; otherwise the scalar's own position.
    fn pos_in_scalar(&self, scalar: &Located<String>, offset: usize) -> Pos {
        let base = pos_of(scalar);
        let value = &scalar.value;
        if value.contains('\n') {
            return base;
        }
        let Some(line) = self
            .src
            .lines()
            .nth(usize::try_from(base.line.saturating_sub(1)).unwrap_or(usize::MAX))
        else {
            return base;
        };
        let col0 = usize::try_from(base.column.saturating_sub(1)).unwrap_or(usize::MAX);
        let Some((start, _)) = line.char_indices().nth(col0) else {
            return base;
        };
        let rest = &line[start..];
        let Some(at) = rest.find(value.as_str()) else {
            return base;
        };
        let prefix =
            rest[..at].chars().count() + value.get(..offset).map_or(0, |p| p.chars().count());
        Pos {
            line: base.line,
            column: base.column + prefix as u64,
        }
    }

    fn template(&mut self, value: &Located<String>, path: &str) -> Option<Template> {
        match Template::parse(&value.value) {
            Ok(t) => Some(t),
            Err(e) => {
                let pos = self.pos_in_scalar(value, e.offset());
                self.err(
                    pos,
                    Code::InvalidTemplate,
                    format!("invalid template in `{path}`: {e}"),
                );
                None
            }
        }
    }

    fn env(&mut self, env: Option<&RawStringMap>, path: &str) -> BTreeMap<String, Template> {
        let mut out = BTreeMap::new();
        for (k, v) in env.into_iter().flatten() {
            let name = &k.value;
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                self.err_at(
                    k,
                    Code::InvalidValue,
                    format!("invalid environment variable name '{name}' in `{path}`: use letters, digits and '_', not starting with a digit"),
                );
                continue;
            }
            if name.starts_with("SHIPINATOR_") {
                self.err_at(
                    k,
                    Code::InvalidValue,
                    format!("environment variable '{name}' in `{path}` is reserved: names starting with SHIPINATOR_ are set by shipinator"),
                );
                continue;
            }
            if let Some(t) = self.template(v, &format!("{path}.{name}")) {
                out.insert(name.clone(), t);
            }
        }
        out
    }

    fn duration(&mut self, d: &Located<String>, path: &str) -> Option<Duration> {
        match parse_duration(&d.value) {
            Ok(v) if v.is_zero() => {
                self.err_at(
                    d,
                    Code::InvalidDuration,
                    format!("`{path}` is zero: use a positive duration such as 30s or 10m"),
                );
                None
            }
            Ok(v) if v > MAX_DURATION => {
                self.err_at(
                    d,
                    Code::InvalidDuration,
                    format!(
                        "`{path}` '{}' is longer than the maximum of 168h (7 days)",
                        d.value
                    ),
                );
                None
            }
            Ok(v) => Some(v),
            Err(hint) => {
                self.err_at(
                    d,
                    Code::InvalidDuration,
                    format!("invalid duration '{}' in `{path}`: {hint}", d.value),
                );
                None
            }
        }
    }

    fn workdir(&mut self, w: &Located<String>, path: &str) -> Option<String> {
        let v = w.value.trim();
        let escapes = v.split(['/', '\\']).any(|c| c == "..");
        if v.is_empty() || v.starts_with('/') || v.starts_with('\\') || escapes || v.contains(':') {
            self.err_at(
                w,
                Code::InvalidValue,
                format!("`{path}.workdir` must be a relative path inside the workspace such as 'app/', found '{}'", w.value),
            );
            return None;
        }
        Some(v.to_owned())
    }

    fn output(
        &mut self,
        out: &Located<RawOutput>,
        path: &str,
        output_names: &mut HashMap<String, Pos>,
    ) -> Option<OutputSpec> {
        let raw = &out.value;
        let artifact_type = match &raw.artifact_type {
            None if self.accounted(out, "type") => None,
            None => {
                self.err_at(
                    out,
                    Code::MissingKey,
                    format!(
                        "`{path}` has no `type`: add `type:` with one of {}",
                        type_list()
                    ),
                );
                None
            }
            Some(t) => match t.value.parse::<ArtifactType>() {
                Ok(at) => Some(at),
                Err(_) => {
                    let hint = suggestion(&t.value, ArtifactType::ALL.iter().map(|a| a.as_str()));
                    self.err_at(
                        t,
                        Code::UnknownArtifactType,
                        format!(
                            "unknown artifact type '{}' in `{path}`{hint}; known types: {}",
                            t.value,
                            type_list()
                        ),
                    );
                    None
                }
            },
        };
        let file_path = raw
            .path
            .as_ref()
            .and_then(|p| self.template(p, &format!("{path}.path")));
        let image_ref = raw
            .image_ref
            .as_ref()
            .and_then(|r| self.template(r, &format!("{path}.ref")));
        if let Some(at) = artifact_type {
            if at == ArtifactType::OciImage {
                if raw.path.is_none() && raw.image_ref.is_none() {
                    self.err_at(
                        out,
                        Code::MissingKey,
                        format!("`{path}` of type oci_image needs `ref` (an image reference such as 'myapp:{{{{ .commit }}}}') or `path` (an OCI archive)"),
                    );
                }
            } else {
                if let Some(r) = &raw.image_ref {
                    self.err_at(
                        r,
                        Code::InvalidValue,
                        format!("`ref` is only for outputs of type oci_image, not {}: use `path` for files", at.as_str()),
                    );
                }
                if raw.path.is_none() {
                    self.err_at(
                        out,
                        Code::MissingKey,
                        format!(
                            "`{path}` has no `path`: add the file's path relative to the workspace"
                        ),
                    );
                }
            }
        }
        let name = match &raw.name {
            None => None,
            Some(n) => {
                let v = n.value.trim();
                if v.is_empty() {
                    self.err_at(n, Code::InvalidValue, format!("`{path}.name` is empty"));
                    None
                } else if v.parse::<ArtifactType>().is_ok() {
                    self.err_at(
                        n,
                        Code::InvalidValue,
                        format!("output name '{v}' is an artifact type: choose another name so that `deploy.artifact` is unambiguous"),
                    );
                    None
                } else if let Some(first) = output_names.get(v) {
                    self.err_at(
                        n,
                        Code::InvalidValue,
                        format!("duplicate output name '{v}' (first used on line {}): output names must be unique", first.line),
                    );
                    None
                } else {
                    output_names.insert(v.to_owned(), pos_of(n));
                    Some(v.to_owned())
                }
            }
        };
        Some(OutputSpec {
            artifact_type: artifact_type?,
            path: file_path,
            image_ref,
            name,
        })
    }

    /// Assigns `parallel_group`s: explicit groups as written, runs of consecutive
    /// `parallel: true` steps without a group get `parallel-N`. A group's steps must be
    /// adjacent.
    fn parallel_groups(&mut self, stage: &str, steps: &[Located<RawStep>], specs: &mut [StepSpec]) {
        if stage != "test" {
            return;
        }
        let explicit: BTreeSet<String> = steps
            .iter()
            .filter_map(|s| s.value.parallel_group.as_ref())
            .map(|g| g.value.trim().to_owned())
            .collect();
        let mut generated = 0usize;
        let mut previous: Option<(Option<String>, bool)> = None; // (group, auto)
        let mut closed: BTreeSet<String> = BTreeSet::new();
        let mut current_auto: Option<String> = None;
        for (step, spec) in steps.iter().zip(specs.iter_mut()) {
            let raw = &step.value;
            let group = match (&raw.parallel_group, &raw.parallel) {
                (Some(g), Some(p)) if !p.value => {
                    self.err_at(
                        p,
                        Code::InvalidValue,
                        format!("step '{}' has `parallel: false` and `parallel_group: {}`: remove one of them", spec.name, g.value),
                    );
                    None
                }
                (Some(g), _) => {
                    let v = g.value.trim();
                    if v.is_empty() {
                        self.err_at(
                            g,
                            Code::InvalidValue,
                            format!("`parallel_group` of step '{}' is empty", spec.name),
                        );
                        None
                    } else {
                        Some((v.to_owned(), false, pos_of(g)))
                    }
                }
                (None, Some(p)) if p.value => {
                    let name = match (&previous, &current_auto) {
                        (Some((Some(_), true)), Some(name)) => name.clone(),
                        _ => loop {
                            generated += 1;
                            let candidate = format!("parallel-{generated}");
                            if !explicit.contains(&candidate) {
                                current_auto = Some(candidate.clone());
                                break candidate;
                            }
                        },
                    };
                    Some((name, true, pos_of(p)))
                }
                _ => None,
            };
            // A group ends when a step outside it follows.
            if let Some((Some(prev), _)) = &previous
                && group.as_ref().is_none_or(|(g, _, _)| g != prev)
            {
                closed.insert(prev.clone());
            }
            if let Some((g, auto, pos)) = &group
                && !*auto
                && closed.contains(g)
            {
                self.err(
                    *pos,
                    Code::InvalidValue,
                    format!("steps of parallel_group '{g}' must be adjacent: move step '{}' next to the other steps of the group", spec.name),
                );
            }
            spec.parallel_group = group.as_ref().map(|(g, _, _)| g.clone());
            previous = Some((
                group.as_ref().map(|(g, _, _)| g.clone()),
                group.as_ref().is_some_and(|(_, a, _)| *a),
            ));
        }
    }

    fn deploy(&mut self, d: &Located<RawDeploy>, produced: &[Produced]) -> Option<DeploySpec> {
        let raw = &d.value;
        let missing = |cx: &mut Self, key: &'static str, example: &str| {
            if cx.accounted(d, key) {
                return;
            }
            cx.err_at(
                d,
                Code::MissingKey,
                format!("`deploy` has no `{key}`: add `{key}: {example}`"),
            );
        };
        if raw.artifact.is_none() {
            missing(
                self,
                "artifact",
                "<an artifact type or output name from the build stage>",
            );
        }
        if raw.target.is_none() {
            missing(self, "target", "local");
        }
        if raw.namespace.is_none() {
            missing(self, "namespace", "<kubernetes namespace>");
        }
        let artifact = raw
            .artifact
            .as_ref()
            .and_then(|a| self.resolve_artifact(a, produced));
        let target = raw.target.as_ref().and_then(|t| {
            let v = t.value.trim();
            if v.is_empty() {
                self.err_at(
                    t,
                    Code::InvalidValue,
                    "`deploy.target` is empty: use `local` for the default kubernetes target"
                        .to_owned(),
                );
                None
            } else {
                Some(v.to_owned())
            }
        });
        let namespace = raw.namespace.as_ref().and_then(|n| {
            if n.value.trim().is_empty() {
                self.err_at(
                    n,
                    Code::InvalidValue,
                    "`deploy.namespace` is empty".to_owned(),
                );
                None
            } else {
                self.template(n, "deploy.namespace")
            }
        });
        let release = raw
            .release
            .as_ref()
            .and_then(|r| self.template(r, "deploy.release"));
        let mut values = BTreeMap::new();
        for (k, v) in raw.values.iter().flatten() {
            if k.value.trim().is_empty() {
                self.err_at(
                    k,
                    Code::InvalidValue,
                    "empty key in `deploy.values`".to_owned(),
                );
                continue;
            }
            if let Some(t) = self.template(v, &format!("deploy.values.{}", k.value)) {
                values.insert(k.value.clone(), t);
            }
        }
        let image = self.image(raw.image.as_ref(), "deploy");
        let branches = raw
            .branches
            .as_ref()
            .map(|b| self.patterns(b, "deploy.branches"))
            .unwrap_or_default();
        let timeout = raw
            .timeout
            .as_ref()
            .and_then(|t| self.duration(t, "deploy.timeout"));
        Some(DeploySpec {
            artifact: artifact?,
            target: target?,
            namespace: namespace?,
            release,
            values,
            image,
            branches,
            timeout,
        })
    }

    fn resolve_artifact(
        &mut self,
        a: &Located<String>,
        produced: &[Produced],
    ) -> Option<ArtifactSelector> {
        let v = a.value.trim();
        if produced.iter().any(|p| p.name.as_deref() == Some(v)) {
            return Some(ArtifactSelector::Output(v.to_owned()));
        }
        if let Ok(at) = v.parse::<ArtifactType>() {
            if produced.iter().any(|p| p.artifact_type == at) {
                return Some(ArtifactSelector::Type(at));
            }
            self.err_at(
                a,
                Code::UnresolvedArtifact,
                format!("deploy.artifact '{v}' is not produced by any build step: add an output with `type: {v}` to a build step"),
            );
            return None;
        }
        let mut candidates: Vec<&str> = produced.iter().filter_map(|p| p.name.as_deref()).collect();
        candidates.extend(produced.iter().map(|p| p.artifact_type.as_str()));
        let hint = match did_you_mean(v, candidates.iter().copied()) {
            Some(s) => format!(" (did you mean '{s}'?)"),
            None => match did_you_mean(v, ArtifactType::ALL.iter().map(|t| t.as_str())) {
                Some(s) => format!(" (did you mean '{s}'? no build step produces it yet)"),
                None => String::new(),
            },
        };
        self.err_at(
            a,
            Code::UnresolvedArtifact,
            format!("deploy.artifact '{v}' is neither a build output `name` nor an artifact type{hint}: use the `name` or `type` of a build step's output"),
        );
        None
    }
}

fn type_list() -> String {
    ArtifactType::ALL
        .iter()
        .map(|t| t.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses `30s`, `5m`, `1h30m`, `500ms`: one or more `<number><unit>` with units `ms`, `s`,
/// `m`, `h`. The error is a hint for the message.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    const HINT: &str = "use a number followed by ms, s, m or h, such as 30s, 5m or 1h30m";
    let s = text.trim();
    if s.is_empty() {
        return Err(HINT.to_owned());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("add a unit, such as '{s}s' or '{s}m'"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(HINT.to_owned());
        }
        let Ok(n) = rest[..digits].parse::<u64>() else {
            return Err("the number is too large".to_owned());
        };
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            _ => return Err(HINT.to_owned()),
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}
