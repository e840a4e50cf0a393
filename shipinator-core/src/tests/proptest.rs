//! Tests: proptest. Random pipelines, scripted outcomes and random interleavings of chaos
//! (duplicate reports, cancel at any moment — including between a persist and its submit —,
//! executor loss, crash and restore from the store at any command boundary), driven through
//! the `Sim` harness, which checks the engine's invariants at every command:
//! - terminal states are absorbing (the store model rejects any move out of one);
//! - no step is submitted before its predecessors (earlier stages, earlier waves) succeeded;
//! - no step is executed again after it was recorded succeeded;
//! - every execution is persisted before it is submitted, and every submitted execution ends
//!   finished or cancelled (nothing still runs on the executor once the run ended);
//! - the artifacts of a stage are inputs of every later build/test step, and the deploy input
//!   is one of them.

use std::time::Duration;

use proptest::prelude::*;

use super::sim::{Outcome, Sim, full_spec, request, step};
use crate::config::PipelineSpec;
use crate::domain::{ArtifactType, RunStatus, Trigger};
use crate::orchestrator::{Input, OrchestratorConfig};

#[derive(Debug, Clone)]
enum Chaos {
    Crash,
    Cancel,
    DuplicateLastReport,
    LoseARunningExecution(usize),
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        6 => Just(Outcome::Succeed),
        1 => (1..3i32).prop_map(Outcome::Exit),
        1 => Just(Outcome::Lose),
        1 => Just(Outcome::Refuse),
        1 => Just(Outcome::Hang),
    ]
}

fn chaos() -> impl Strategy<Value = Chaos> {
    prop_oneof![
        2 => Just(Chaos::Crash),
        1 => Just(Chaos::Cancel),
        2 => Just(Chaos::DuplicateLastReport),
        1 => (0..4usize).prop_map(Chaos::LoseARunningExecution),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    build_steps: usize,
    test_groups: Vec<bool>,
    trigger: Trigger,
    scripts: Vec<(usize, u32, Outcome)>,
    durations: Vec<u64>,
    chaos: Vec<(usize, Chaos)>,
    max_attempts: u32,
}

fn case() -> impl Strategy<Value = Case> {
    (
        1..4usize,
        prop::collection::vec(any::<bool>(), 1..5),
        prop_oneof![
            Just(Trigger::Push),
            Just(Trigger::Pr),
            Just(Trigger::Manual)
        ],
        prop::collection::vec((0..9usize, 1..4u32, outcome()), 0..6),
        prop::collection::vec(0..8u64, 9),
        prop::collection::vec((0..120usize, chaos()), 0..6),
        1..4u32,
    )
        .prop_map(
            |(build_steps, test_groups, trigger, scripts, durations, chaos, max_attempts)| Case {
                build_steps,
                test_groups,
                trigger,
                scripts,
                durations,
                chaos,
                max_attempts,
            },
        )
}

/// The pipeline of a case: `build_steps` build steps (the last one makes the chart), test
/// steps where `true` joins the parallel group of the previous `true` step, and a deploy.
fn spec_of(case: &Case) -> (PipelineSpec, Vec<String>) {
    let mut spec = full_spec();
    let mut names = Vec::new();
    let build = spec.build.as_mut().expect("build");
    let chart = build.steps[1].clone();
    build.steps.clear();
    for i in 0..case.build_steps {
        let mut s = if i + 1 == case.build_steps {
            chart.clone()
        } else {
            step(&format!("b{i}"))
        };
        s.name = format!("b{i}");
        if i == 0 {
            s.outputs
                .push(super::sim::output(ArtifactType::Binary, "bin/app", None));
        }
        names.push(s.name.clone());
        build.steps.push(s);
    }
    let test = spec.test.as_mut().expect("test");
    test.steps.clear();
    let mut group = 0;
    for (i, parallel) in case.test_groups.iter().enumerate() {
        let mut s = step(&format!("t{i}"));
        if *parallel {
            s.parallel_group = Some(format!("g{group}"));
        } else {
            group += 1;
        }
        names.push(s.name.clone());
        test.steps.push(s);
    }
    names.push("deploy".to_owned());
    (spec, names)
}

fn run_case(case: &Case) -> Result<(), TestCaseError> {
    let (spec, names) = spec_of(case);
    let mut sim = Sim::new(OrchestratorConfig {
        max_attempts: case.max_attempts,
        default_step_timeout: Some(Duration::from_secs(60)),
        executor_type: "sim".to_owned(),
    });
    for (i, attempt, outcome) in &case.scripts {
        if let Some(name) = names.get(*i) {
            sim.script(name, *attempt, *outcome);
        }
    }
    for (name, secs) in names.iter().zip(&case.durations) {
        sim.duration(name, Duration::from_secs(*secs));
    }
    let mut req = request(spec, case.trigger, "main");
    if case.trigger == Trigger::Manual {
        req.stages = Some(vec![
            crate::domain::JobType::Build,
            crate::domain::JobType::Test,
            crate::domain::JobType::Deploy,
        ]);
    }
    let run = sim.create(&req);
    let mut chaos = case.chaos.clone();
    chaos.sort_by_key(|(at, _)| *at);
    let mut chaos = chaos.into_iter().peekable();
    let mut i = 0usize;
    loop {
        while let Some((_, c)) = chaos.next_if(|(at, _)| *at == i) {
            match c {
                Chaos::Crash => sim.crash_and_restore(),
                Chaos::Cancel => sim.input(Input::CancelRequested { run_id: run }),
                Chaos::DuplicateLastReport => {
                    if let Some(input) = sim.last_report.clone() {
                        sim.input(input);
                    }
                }
                Chaos::LoseARunningExecution(k) => {
                    let active = sim.orch.active_executions();
                    if let Some(h) = active.get(k % active.len().max(1)) {
                        sim.lose(h.execution_id);
                    }
                }
            }
        }
        i += 1;
        if !sim.step() && chaos.peek().is_none() {
            break;
        }
        prop_assert!(i < 200_000, "the simulation does not settle");
    }
    sim.check_at_rest();
    prop_assert!(
        sim.violations.is_empty(),
        "violations: {:#?}",
        sim.violations
    );
    let status = sim.run_status(run).0;
    prop_assert!(status.is_terminal(), "run ended {status}");
    let rec = sim.record(run);
    prop_assert!(rec.executions.iter().all(|e| e.status.is_terminal()));
    // A run without any failure script, loss or cancel succeeds.
    if case.scripts.is_empty()
        && case
            .chaos
            .iter()
            .all(|(_, c)| matches!(c, Chaos::Crash | Chaos::DuplicateLastReport))
    {
        prop_assert_eq!(status, RunStatus::Success);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_interleavings_keep_the_invariants(case in case()) {
        run_case(&case)?;
    }
}
