//! Jobs as the API shows them: the [`JobRecord`], its log chunks and owner notices, and the job's
//! life cycle as one pure transition function, shown identically to both sides.
//!
//! ```text
//! queued ─▶ transferring ─▶ running ⇄ paused
//!   │            │             │         │
//!   └────────────┴─────────────┴─────────┴─▶ finished | failed | cancelled
//! ```
//!
//! A job that ran to its end is `finished` with its exit code, whatever the code: the code is the
//! job's own answer. `failed` is for a job the sandbox stopped or could not run (a deadline, a
//! memory limit, a missing input), with the reason. `cancelled` is a request from the consumer or
//! the owner. The three are terminal. Everything that changes a job's state goes through
//! [`JobState::apply`], so an impossible change (resuming a finished job) is an error, never a
//! silently wrong state.

use crate::ids::JobId;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where a job is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobState {
    /// Accepted, waiting for capacity.
    Queued,
    /// Inputs and module or image are arriving.
    Transferring,
    /// Its processes are running.
    Running,
    /// Frozen, because the owner needs the machine or someone asked.
    Paused,
    /// Ran to its end.
    Finished {
        /// The job's exit code.
        exit_code: i32,
    },
    /// Stopped by the sandbox, or could not run.
    Failed {
        /// Why, for people.
        reason: String,
    },
    /// Stopped on request.
    Cancelled {
        /// Why, when it was not the consumer's own request (the owner needed the machine back).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

/// Something that happens to a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Its inputs start to arrive.
    BeginTransfer,
    /// Its processes start.
    Start,
    /// Freeze it.
    Pause,
    /// Thaw it.
    Resume,
    /// Its main process exited on its own.
    Exit {
        /// The exit code.
        code: i32,
    },
    /// The sandbox stopped it, or it could not run.
    Fail {
        /// Why.
        reason: String,
    },
    /// Stop it on request.
    Cancel,
}

/// A transition that is not allowed from the job's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {transition} a job that is {state}")]
pub struct TransitionError {
    /// The job's state, as a word.
    pub state: &'static str,
    /// The refused transition, as a verb.
    pub transition: &'static str,
}

impl JobState {
    /// The state's name as shown to people and in JSON.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Transferring => "transferring",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Finished { .. } => "finished",
            Self::Failed { .. } => "failed",
            Self::Cancelled { .. } => "cancelled",
        }
    }

    /// True once nothing more can happen to the job.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Finished { .. } | Self::Failed { .. } | Self::Cancelled { .. })
    }

    /// The state after `transition`, or why it is not allowed.
    pub fn apply(&self, transition: Transition) -> Result<Self, TransitionError> {
        use JobState as S;
        use Transition as T;
        match (self, transition) {
            (S::Queued, T::BeginTransfer) => Ok(S::Transferring),
            (S::Queued | S::Transferring, T::Start) => Ok(S::Running),
            (S::Running, T::Pause) => Ok(S::Paused),
            (S::Paused, T::Resume) => Ok(S::Running),
            (S::Running, T::Exit { code }) => Ok(S::Finished { exit_code: code }),
            (state, T::Fail { reason }) if !state.is_terminal() => Ok(S::Failed { reason }),
            (state, T::Cancel) if !state.is_terminal() => Ok(S::Cancelled { reason: None }),
            (state, transition) => {
                Err(TransitionError { state: state.name(), transition: transition.verb() })
            }
        }
    }
}

impl Transition {
    fn verb(&self) -> &'static str {
        match self {
            Self::BeginTransfer => "transfer inputs to",
            Self::Start => "start",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Exit { .. } => "record the exit of",
            Self::Fail { .. } => "fail",
            Self::Cancel => "cancel",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_states() -> Vec<JobState> {
        vec![
            JobState::Queued,
            JobState::Transferring,
            JobState::Running,
            JobState::Paused,
            JobState::Finished { exit_code: 0 },
            JobState::Failed { reason: "deadline".into() },
            JobState::Cancelled { reason: None },
        ]
    }

    fn all_transitions() -> Vec<Transition> {
        vec![
            Transition::BeginTransfer,
            Transition::Start,
            Transition::Pause,
            Transition::Resume,
            Transition::Exit { code: 3 },
            Transition::Fail { reason: "out of memory".into() },
            Transition::Cancel,
        ]
    }

    #[test]
    fn the_allowed_transitions_are_exactly_the_documented_ones() {
        // (from, transition index in all_transitions(), to) for every allowed move; all others fail.
        let allowed: Vec<(&str, usize, &str)> = vec![
            ("queued", 0, "transferring"),
            ("queued", 1, "running"),
            ("queued", 5, "failed"),
            ("queued", 6, "cancelled"),
            ("transferring", 1, "running"),
            ("transferring", 5, "failed"),
            ("transferring", 6, "cancelled"),
            ("running", 2, "paused"),
            ("running", 4, "finished"),
            ("running", 5, "failed"),
            ("running", 6, "cancelled"),
            ("paused", 3, "running"),
            ("paused", 5, "failed"),
            ("paused", 6, "cancelled"),
        ];
        for state in all_states() {
            for (i, transition) in all_transitions().into_iter().enumerate() {
                let expected = allowed.iter().find(|(from, t, _)| *from == state.name() && *t == i);
                match (state.apply(transition.clone()), expected) {
                    (Ok(next), Some((_, _, to))) => {
                        assert_eq!(next.name(), *to, "{state:?} + {transition:?}")
                    }
                    (Err(_), None) => {}
                    (outcome, _) => panic!("{state:?} + {transition:?} gave {outcome:?}"),
                }
            }
        }
    }

    #[test]
    fn terminal_states_keep_the_exit_code_and_the_reason() {
        let finished = JobState::Running.apply(Transition::Exit { code: 3 }).unwrap();
        assert_eq!(finished, JobState::Finished { exit_code: 3 });
        assert!(finished.is_terminal());
        let failed = JobState::Paused.apply(Transition::Fail { reason: "deadline of 60s".into() }).unwrap();
        assert_eq!(failed, JobState::Failed { reason: "deadline of 60s".into() });
        let err = failed.apply(Transition::Resume).unwrap_err();
        assert_eq!(err.to_string(), "cannot resume a job that is failed");
    }

    #[test]
    fn states_serialise_as_tagged_objects() {
        let json = serde_json::to_value(JobState::Finished { exit_code: 0 }).unwrap();
        assert_eq!(json, serde_json::json!({"state": "finished", "exit_code": 0}));
        let back: JobState = serde_json::from_value(serde_json::json!({"state": "paused"})).unwrap();
        assert_eq!(back, JobState::Paused);
    }
}

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    /// The log file's name in the job folder.
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Stdout => "stdout.log",
            Self::Stderr => "stderr.log",
        }
    }
}

/// A job as the store keeps it and the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobRecord {
    /// The job's id on this agent.
    pub id: JobId,
    /// `wasi` or `native`.
    pub kind: String,
    /// The spec file it came from: for a job submitted through the API, its staged copy under
    /// `DATA/uploads/`, removed when the job ends.
    #[schema(value_type = String)]
    pub spec_path: PathBuf,
    /// Its folder, holding `out/` and the logs.
    #[schema(value_type = String)]
    pub job_dir: PathBuf,
    /// Where it is in its life, with the exit code or failure reason once it ended.
    #[serde(flatten)]
    pub state: JobState,
    /// When it was accepted, in Unix seconds.
    pub created_at: i64,
    /// When its state last changed, in Unix seconds.
    pub updated_at: i64,
}

/// What an owner may ask of a running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobAction {
    /// Freeze it.
    Pause,
    /// Thaw it.
    Resume,
    /// Stop it for good.
    Cancel,
}

impl JobAction {
    /// The life-cycle step it asks for.
    pub fn transition(self) -> Transition {
        match self {
            Self::Pause => Transition::Pause,
            Self::Resume => Transition::Resume,
            Self::Cancel => Transition::Cancel,
        }
    }

    /// What it did, as a past participle: `paused`, `resumed`, `cancelled`.
    pub fn past_tense(self) -> &'static str {
        match self {
            Self::Pause => "paused",
            Self::Resume => "resumed",
            Self::Cancel => "cancelled",
        }
    }
}

/// What the owner did to a job, for its consumer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct OwnerNotice {
    /// The job.
    pub job_id: JobId,
    /// `paused`, `resumed` or `stopped`.
    pub kind: String,
    /// Why, for people.
    pub reason: String,
    /// When, in Unix seconds.
    pub at: i64,
}

/// A piece of a job's log, as `GET /api/v1/jobs/{id}/logs/{stream}` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LogChunk {
    /// The bytes from `offset` on, as text (invalid UTF-8 replaced).
    pub text: String,
    /// The offset to ask from next time.
    pub next_offset: u64,
    /// True once the job has ended, so nothing more will come.
    pub finished: bool,
}

/// A job's end, for people.
pub fn ended(state: &JobState) -> String {
    match state {
        JobState::Finished { exit_code } => format!("exited with code {exit_code}"),
        JobState::Failed { reason } => format!("failed: {reason}"),
        JobState::Cancelled { reason: Some(reason) } => format!("cancelled: {reason}"),
        other => other.name().to_owned(),
    }
}
