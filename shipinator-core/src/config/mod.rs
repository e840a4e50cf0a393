//! `.shipinator.yaml`: raw serde types mirroring the file, one validation pass into a
//! [`PipelineSpec`], and located, actionable errors.

mod spec;

pub use spec::{
    ArtifactSelector, DeploySpec, OutputSpec, PipelineSpec, StageSpec, StepSpec, Template,
    TemplateContext, TemplateError, TemplatePart, TemplateVar, Triggers,
};

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

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}
