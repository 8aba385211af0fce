//! What the ledger's routes answer: earnings by period, resource kind and peer, and the report of
//! a verification with what each witness said.

use crate::ids::PeerId;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a receipt charges, per resource kind, in thousandths of a credit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Charges {
    /// For the cores.
    pub cpu: u64,
    /// For the memory.
    pub memory: u64,
    /// For the GPUs.
    pub gpu: u64,
}

impl Charges {
    /// The three together.
    pub fn total(&self) -> u64 {
        self.cpu.saturating_add(self.memory).saturating_add(self.gpu)
    }
}

/// How earnings are grouped in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// UTC calendar days: `2026-12-05`.
    Day,
    /// ISO weeks: `2026-W49`.
    Week,
    /// Calendar months: `2026-12`.
    Month,
}

/// Credits of one side (earned or spent), in thousandths of a credit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Totals {
    /// Everything together.
    pub amount: u64,
    /// How many receipts.
    pub receipts: u64,
    /// By resource kind.
    pub by_kind: Charges,
    /// By the other side's peer id.
    pub by_peer: BTreeMap<PeerId, u64>,
}

/// One period's credits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PeriodEarnings {
    /// The period's name (see [`Period`]); `all` when not grouped.
    pub period: String,
    /// As a provider.
    pub earned: Totals,
    /// As a consumer.
    pub spent: Totals,
}

/// What `hearth earnings` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Earnings {
    /// Whose.
    pub owner: PeerId,
    /// Oldest first; one `all` entry when not grouped by period.
    pub periods: Vec<PeriodEarnings>,
    /// Every period together.
    pub total: PeriodEarnings,
}

/// The first bad row, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Broken {
    /// The row's sequence number (for a missing row, the number it should have had).
    pub seq: u64,
    /// What is wrong, for people.
    pub problem: String,
}

/// What a checkpoint another agent holds says about this ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Witnessed {
    /// The ledger holds the checkpoint's row with the same hash.
    Matches,
    /// The ledger ends before the checkpoint's row: rows were removed from its end.
    Truncated,
    /// The checkpoint's row has another hash: the history was rewritten.
    Forked,
    /// The witness answered with something this ledger's owner did not sign.
    Invalid,
    /// The witness holds no checkpoint of this ledger.
    None,
    /// The witness could not be asked.
    Unreachable,
}

/// One witness's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WitnessCheck {
    /// The agent that holds the checkpoint.
    pub peer: PeerId,
    /// The checkpoint's row, when there was one.
    pub seq: Option<u64>,
    /// What it says.
    pub verdict: Witnessed,
    /// For people.
    pub detail: String,
}

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Report {
    /// Whose ledger.
    pub owner: PeerId,
    /// Rows read.
    pub rows: u64,
    /// Countersigned receipts among them.
    pub receipts: u64,
    /// The last row's hash.
    pub head: Option<String>,
    /// The first bad row; `None` when the chain and every signature hold.
    pub broken: Option<Broken>,
    /// What the checkpoints held by other agents say.
    pub witnesses: Vec<WitnessCheck>,
}

impl Report {
    /// Whether the ledger verified: intact, and no witness saw another history.
    pub fn ok(&self) -> bool {
        self.broken.is_none()
    }
}
