//! Tests: fsm. Every (state, event) pair of every machine in one table, plus the laws the
//! table must obey (terminal states absorbing, transitions idempotent).

use std::fmt::Write as _;

use crate::domain::{JobType, RunStatus, Status};
use crate::fsm::run::RunEvent;
use crate::fsm::{InvalidTransition, WorkEvent, execution, job, run, step};

type WorkFn = fn(Status, WorkEvent) -> Result<Status, InvalidTransition>;

fn machines() -> [(&'static str, WorkFn); 3] {
    [
        ("job", job::on),
        ("step", step::on),
        ("execution", execution::on),
    ]
}

fn table() -> String {
    let mut out = String::new();
    for from in RunStatus::ALL {
        for ev in RunEvent::ALL {
            let to = match run::on(*from, ev) {
                Ok(to) if to == *from => "(unchanged)".to_owned(),
                Ok(to) => to.to_string(),
                Err(e) => format!("error: {e}"),
            };
            writeln!(out, "run       {from:<9} {ev:<8} -> {to}").unwrap();
        }
    }
    for (name, f) in machines() {
        for from in Status::ALL {
            for ev in WorkEvent::ALL {
                let to = match f(*from, ev) {
                    Ok(to) if to == *from => "(unchanged)".to_owned(),
                    Ok(to) => to.to_string(),
                    Err(e) => format!("error: {e}"),
                };
                writeln!(out, "{name:<9} {from:<9} {ev:<8} -> {to}").unwrap();
            }
        }
    }
    out
}

#[test]
fn every_state_event_pair() {
    expect_test::expect![[r#"
        run       pending   start -> running
        run       pending   succeed -> error: cannot succeed a pending run
        run       pending   fail -> failed
        run       pending   cancel -> canceled
        run       running   start -> (unchanged)
        run       running   succeed -> success
        run       running   fail -> failed
        run       running   cancel -> canceled
        run       success   start -> error: cannot start a success run
        run       success   succeed -> (unchanged)
        run       success   fail -> error: cannot fail a success run
        run       success   cancel -> (unchanged)
        run       failed    start -> error: cannot start a failed run
        run       failed    succeed -> error: cannot succeed a failed run
        run       failed    fail -> (unchanged)
        run       failed    cancel -> (unchanged)
        run       canceled  start -> error: cannot start a canceled run
        run       canceled  succeed -> error: cannot succeed a canceled run
        run       canceled  fail -> error: cannot fail a canceled run
        run       canceled  cancel -> (unchanged)
        job       pending   start -> running
        job       pending   succeed -> error: cannot succeed a pending job
        job       pending   fail -> error: cannot fail a pending job
        job       pending   cancel -> canceled
        job       pending   skip -> skipped
        job       running   start -> (unchanged)
        job       running   succeed -> succeeded
        job       running   fail -> failed
        job       running   cancel -> canceled
        job       running   skip -> error: cannot skip a running job
        job       succeeded start -> error: cannot start a succeeded job
        job       succeeded succeed -> (unchanged)
        job       succeeded fail -> error: cannot fail a succeeded job
        job       succeeded cancel -> (unchanged)
        job       succeeded skip -> error: cannot skip a succeeded job
        job       failed    start -> error: cannot start a failed job
        job       failed    succeed -> error: cannot succeed a failed job
        job       failed    fail -> (unchanged)
        job       failed    cancel -> (unchanged)
        job       failed    skip -> error: cannot skip a failed job
        job       canceled  start -> error: cannot start a canceled job
        job       canceled  succeed -> error: cannot succeed a canceled job
        job       canceled  fail -> error: cannot fail a canceled job
        job       canceled  cancel -> (unchanged)
        job       canceled  skip -> error: cannot skip a canceled job
        job       skipped   start -> error: cannot start a skipped job
        job       skipped   succeed -> error: cannot succeed a skipped job
        job       skipped   fail -> error: cannot fail a skipped job
        job       skipped   cancel -> (unchanged)
        job       skipped   skip -> (unchanged)
        step      pending   start -> running
        step      pending   succeed -> error: cannot succeed a pending step
        step      pending   fail -> error: cannot fail a pending step
        step      pending   cancel -> canceled
        step      pending   skip -> skipped
        step      running   start -> (unchanged)
        step      running   succeed -> succeeded
        step      running   fail -> failed
        step      running   cancel -> canceled
        step      running   skip -> error: cannot skip a running step
        step      succeeded start -> error: cannot start a succeeded step
        step      succeeded succeed -> (unchanged)
        step      succeeded fail -> error: cannot fail a succeeded step
        step      succeeded cancel -> (unchanged)
        step      succeeded skip -> error: cannot skip a succeeded step
        step      failed    start -> error: cannot start a failed step
        step      failed    succeed -> error: cannot succeed a failed step
        step      failed    fail -> (unchanged)
        step      failed    cancel -> (unchanged)
        step      failed    skip -> error: cannot skip a failed step
        step      canceled  start -> error: cannot start a canceled step
        step      canceled  succeed -> error: cannot succeed a canceled step
        step      canceled  fail -> error: cannot fail a canceled step
        step      canceled  cancel -> (unchanged)
        step      canceled  skip -> error: cannot skip a canceled step
        step      skipped   start -> error: cannot start a skipped step
        step      skipped   succeed -> error: cannot succeed a skipped step
        step      skipped   fail -> error: cannot fail a skipped step
        step      skipped   cancel -> (unchanged)
        step      skipped   skip -> (unchanged)
        execution pending   start -> running
        execution pending   succeed -> succeeded
        execution pending   fail -> failed
        execution pending   cancel -> canceled
        execution pending   skip -> error: cannot skip a pending execution
        execution running   start -> (unchanged)
        execution running   succeed -> succeeded
        execution running   fail -> failed
        execution running   cancel -> canceled
        execution running   skip -> error: cannot skip a running execution
        execution succeeded start -> error: cannot start a succeeded execution
        execution succeeded succeed -> (unchanged)
        execution succeeded fail -> error: cannot fail a succeeded execution
        execution succeeded cancel -> (unchanged)
        execution succeeded skip -> error: cannot skip a succeeded execution
        execution failed    start -> error: cannot start a failed execution
        execution failed    succeed -> error: cannot succeed a failed execution
        execution failed    fail -> (unchanged)
        execution failed    cancel -> (unchanged)
        execution failed    skip -> error: cannot skip a failed execution
        execution canceled  start -> error: cannot start a canceled execution
        execution canceled  succeed -> error: cannot succeed a canceled execution
        execution canceled  fail -> error: cannot fail a canceled execution
        execution canceled  cancel -> (unchanged)
        execution canceled  skip -> error: cannot skip a canceled execution
        execution skipped   start -> error: cannot start a skipped execution
        execution skipped   succeed -> error: cannot succeed a skipped execution
        execution skipped   fail -> error: cannot fail a skipped execution
        execution skipped   cancel -> (unchanged)
        execution skipped   skip -> (unchanged)
    "#]]
    .assert_eq(&table());
}

#[test]
fn terminal_states_are_absorbing_and_transitions_idempotent() {
    for from in RunStatus::ALL {
        for ev in RunEvent::ALL {
            match run::on(*from, ev) {
                Ok(to) => {
                    if from.is_terminal() {
                        assert_eq!(to, *from, "run {from} {ev}");
                    }
                    assert_eq!(run::on(to, ev), Ok(to), "run {from} {ev} twice");
                }
                Err(e) => assert_eq!((e.from, e.event), (from.as_str(), ev.as_str())),
            }
        }
    }
    for (name, f) in machines() {
        for from in Status::ALL {
            for ev in WorkEvent::ALL {
                match f(*from, ev) {
                    Ok(to) => {
                        if from.is_terminal() {
                            assert_eq!(to, *from, "{name} {from} {ev}");
                        }
                        assert_eq!(f(to, ev), Ok(to), "{name} {from} {ev} twice");
                    }
                    Err(e) => assert_eq!(e.machine.as_str(), name),
                }
            }
        }
    }
}

#[test]
fn phase_is_derived_from_jobs() {
    use Status::{Canceled, Failed, Pending, Running, Skipped, Succeeded};
    let cases: &[&[(JobType, Status, bool)]] = &[
        &[],
        &[
            (JobType::Build, Pending, false),
            (JobType::Test, Pending, false),
        ],
        &[
            (JobType::Build, Running, true),
            (JobType::Test, Pending, false),
        ],
        &[
            (JobType::Build, Succeeded, true),
            (JobType::Test, Pending, false),
        ],
        &[
            (JobType::Build, Succeeded, true),
            (JobType::Test, Running, true),
        ],
        &[
            (JobType::Build, Succeeded, true),
            (JobType::Test, Failed, true),
            (JobType::Deploy, Skipped, false),
        ],
        &[
            (JobType::Build, Succeeded, true),
            (JobType::Test, Succeeded, true),
        ],
        &[
            (JobType::Build, Canceled, true),
            (JobType::Test, Canceled, false),
        ],
        &[
            (JobType::Build, Succeeded, true),
            (JobType::Test, Canceled, false),
        ],
        &[
            (JobType::Build, Succeeded, true),
            (JobType::Test, Succeeded, true),
            (JobType::Deploy, Succeeded, true),
        ],
    ];
    let out: Vec<String> = cases
        .iter()
        .map(|jobs| {
            let desc: Vec<String> = jobs
                .iter()
                .map(|(j, s, st)| format!("{j}={s}{}", if *st { "" } else { "(never started)" }))
                .collect();
            format!(
                "[{}] -> {}",
                desc.join(", "),
                run::phase(jobs.iter().copied())
            )
        })
        .collect();
    expect_test::expect![[r#"
        [] -> submitted
        [build=pending(never started), test=pending(never started)] -> submitted
        [build=running, test=pending(never started)] -> building
        [build=succeeded, test=pending(never started)] -> built
        [build=succeeded, test=running] -> testing
        [build=succeeded, test=failed, deploy=skipped(never started)] -> testing
        [build=succeeded, test=succeeded] -> tested
        [build=canceled, test=canceled(never started)] -> building
        [build=succeeded, test=canceled(never started)] -> built
        [build=succeeded, test=succeeded, deploy=succeeded] -> deployed"#]]
    .assert_eq(&out.join("\n"));
}
