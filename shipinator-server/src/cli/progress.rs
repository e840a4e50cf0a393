//! What `shipinator run` shows while a run goes on: on a terminal, one live line per step
//! (spinner, state, duration) with the running step's last log lines under it; otherwise one
//! plain line per change. Both go to stderr, so stdout holds only the final record.

use std::collections::{HashMap, VecDeque};
use std::io::IsTerminal as _;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use shipinator_core::domain::{Status, StepId};
use shipinator_core::time::Timestamp;

use super::run::fmt_duration;

/// How many of a running step's latest log lines the terminal view shows.
const TAIL_LINES: usize = 3;
/// The widest log line shown under a step (the terminal view must not wrap).
const TAIL_WIDTH: usize = 100;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Nothing (the final record is JSON).
    Quiet,
    /// One line per change.
    Plain,
    /// Live lines on a terminal.
    Live,
}

impl Mode {
    /// Live when both stdout and stderr are terminals, plain otherwise.
    pub(crate) fn detect(human: bool) -> Self {
        if !human {
            Self::Quiet
        } else if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
            Self::Live
        } else {
            Self::Plain
        }
    }
}

#[derive(Debug)]
struct StepLine {
    bar: ProgressBar,
    tail: VecDeque<String>,
}

/// The progress view of one run.
#[derive(Debug)]
pub(crate) struct Progress {
    mode: Mode,
    stream_logs: bool,
    names: HashMap<StepId, String>,
    /// Step order (stage, then position), for placing live lines.
    order: Vec<StepId>,
    started: HashMap<StepId, Timestamp>,
    multi: MultiProgress,
    lines: HashMap<StepId, StepLine>,
}

impl Progress {
    /// A view of the steps `names`, in `order`; `stream_logs` prints every log line.
    pub(crate) fn new(
        mode: Mode,
        names: HashMap<StepId, String>,
        order: Vec<StepId>,
        stream_logs: bool,
    ) -> Self {
        let target = if mode == Mode::Live {
            ProgressDrawTarget::stderr_with_hz(10)
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            mode,
            stream_logs,
            names,
            order,
            started: HashMap::new(),
            multi: MultiProgress::with_draw_target(target),
            lines: HashMap::new(),
        }
    }

    /// Whether log lines are wanted at all (live tails or `--logs`).
    pub(crate) fn wants_logs(&self) -> bool {
        self.mode == Mode::Live || (self.mode == Mode::Plain && self.stream_logs)
    }

    fn name(&self, step: StepId) -> &str {
        self.names.get(&step).map_or("?", String::as_str)
    }

    /// A message for the person watching (cancelling, resuming).
    pub(crate) fn note(&self, text: &str) {
        match self.mode {
            Mode::Quiet | Mode::Plain => eprintln!("{text}"),
            Mode::Live => {
                let _ = self.multi.println(text);
            }
        }
    }

    /// A step changed state at `at`.
    pub(crate) fn step_changed(
        &mut self,
        step: StepId,
        status: Status,
        attempt: u32,
        at: Timestamp,
    ) {
        let name = self.name(step).to_owned();
        let note = if attempt > 1 {
            format!(" (attempt {attempt})")
        } else {
            String::new()
        };
        if status == Status::Running {
            self.started.insert(step, at);
        }
        let took = || {
            self.started
                .get(&step)
                .map(|t| format!(" in {}", fmt_duration(at.saturating_duration_since(*t))))
                .unwrap_or_default()
        };
        match self.mode {
            Mode::Quiet => {}
            Mode::Plain => match status {
                Status::Running => eprintln!("{} {name} running{note}", marker(status)),
                s if s.is_terminal() => eprintln!("{} {name} {s}{}{note}", marker(s), took()),
                _ => {}
            },
            Mode::Live => match status {
                Status::Running => {
                    let bar = self.line(step);
                    bar.bar.set_style(running_style());
                    bar.bar.set_prefix(name);
                    bar.bar.set_message(format!("running{note}"));
                    bar.bar.reset_elapsed();
                    bar.bar.enable_steady_tick(Duration::from_millis(100));
                    bar.tail.clear();
                }
                s if s.is_terminal() => {
                    let took = took();
                    let line = self.line(step);
                    line.bar.set_style(done_style());
                    line.bar.set_prefix(name);
                    line.bar
                        .finish_with_message(format!("{} {s}{took}{note}", marker(s)));
                }
                _ => {}
            },
        }
    }

    /// The live line of `step`, created in its place among the others.
    fn line(&mut self, step: StepId) -> &mut StepLine {
        let line = match self.lines.remove(&step) {
            Some(line) => line,
            None => self.new_line(step),
        };
        self.lines.entry(step).or_insert(line)
    }

    fn new_line(&self, step: StepId) -> StepLine {
        let pos = self.order.iter().position(|s| *s == step);
        // After the last existing line of an earlier step, so lines stay in step order.
        let before = pos.and_then(|p| {
            self.order[..p]
                .iter()
                .rev()
                .find_map(|s| self.lines.get(s).map(|l| l.bar.clone()))
        });
        let bar = ProgressBar::new_spinner();
        let bar = match before {
            Some(prev) => self.multi.insert_after(&prev, bar),
            None => self.multi.insert(0, bar),
        };
        StepLine {
            bar,
            tail: VecDeque::new(),
        }
    }

    /// A log line of `step`.
    pub(crate) fn log_line(&mut self, step: StepId, text: &str) {
        match self.mode {
            Mode::Quiet => {}
            Mode::Plain => {
                if self.stream_logs {
                    println!("[{}] {text}", self.name(step));
                }
            }
            Mode::Live => {
                if self.stream_logs {
                    let _ = self.multi.println(format!("[{}] {text}", self.name(step)));
                }
                let Some(line) = self.lines.get_mut(&step) else {
                    return;
                };
                if line.bar.is_finished() {
                    return;
                }
                let mut shown: String = text.chars().filter(|c| !c.is_control()).collect();
                if shown.chars().count() > TAIL_WIDTH {
                    shown = shown.chars().take(TAIL_WIDTH - 1).collect();
                    shown.push('…');
                }
                line.tail.push_back(shown);
                while line.tail.len() > TAIL_LINES {
                    line.tail.pop_front();
                }
                let tail: String = line.tail.iter().map(|l| format!("\n    │ {l}")).collect();
                line.bar.set_message(format!("running{tail}"));
            }
        }
    }

    /// Stops the live view, leaving every step's final line on screen.
    pub(crate) fn finish(&mut self) {
        for line in self.lines.values() {
            if !line.bar.is_finished() {
                line.bar.abandon();
            }
        }
    }
}

fn running_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner:.cyan} {prefix:32} {elapsed:>4} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
        .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ ")
}

fn done_style() -> ProgressStyle {
    ProgressStyle::with_template("  {prefix:32} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

pub(crate) fn marker(status: Status) -> &'static str {
    match status {
        Status::Running => "…",
        Status::Succeeded => "✓",
        Status::Failed => "✗",
        Status::Canceled => "■",
        Status::Skipped => "-",
        Status::Pending => " ",
    }
}
