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

/// What `hearth earnings` shows: the receipts of the verified chain, one per agreement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Earnings {
    /// Whose.
    pub owner: PeerId,
    /// Oldest first; one `all` entry when not grouped by period.
    pub periods: Vec<PeriodEarnings>,
    /// Every period together.
    pub total: PeriodEarnings,
    /// The ledger's first bad row, when it has one: receipts from there on are not counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken: Option<Broken>,
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

/// What vouches for the end of the rows verified.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Anchor {
    /// The ledger was read from its store file, whose owner was not asked to sign its head.
    #[default]
    Store,
    /// The export ends with its owner's signed head, and the head is the last row.
    Signed,
    /// The export has no signed head: nothing shows that rows were not cut from its end, or that
    /// unsigned rows (`transfer`, `release`) were not edited and the chain computed again.
    Unsigned,
    /// The export's signed head does not verify, or pins another row (`broken` says which).
    Invalid,
}

/// A checkpoint the ledger's owner holds of another agent's ledger, as an export carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeldCheck {
    /// Whose ledger the checkpoint is of (its signer).
    pub peer: PeerId,
    /// The row it pins.
    pub seq: u64,
    /// That row's hash.
    pub head: String,
    /// Whether `peer`'s signature over it verifies.
    pub verifies: bool,
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
    /// What vouches for the end of the rows.
    #[serde(default)]
    pub anchor: Anchor,
    /// The checkpoints of other agents' ledgers an export carries (`--with-witnesses`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<HeldCheck>,
}

impl Report {
    /// Whether the ledger verified: intact, and no witness saw another history.
    pub fn ok(&self) -> bool {
        self.broken.is_none()
    }

    /// Whether it verified and its end is vouched for: what `hearth ledger verify --strict`
    /// demands of an export.
    pub fn ok_strict(&self) -> bool {
        self.ok() && self.anchor != Anchor::Unsigned
    }
}

/// A signed document as it travels: `{"body": BODY, "signature": HEX}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignedDocument {
    /// What was signed.
    #[schema(value_type = Object)]
    pub body: serde_json::Value,
    /// The Ed25519 signature (128 hex digits) over the domain tag and `body`'s canonical bytes.
    pub signature: String,
}

/// The checkpoint one counterparty holds of this agent's ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WitnessAnswer {
    /// The counterparty.
    pub witness: PeerId,
    /// The newest checkpoint of this ledger it holds, signed by this agent; `None` with `error`
    /// when it could not be asked, alone when it holds none.
    pub checkpoint: Option<SignedDocument>,
    /// Why it could not be asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A checkpoint another agent signed of its own ledger, held by this agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeldCheckpoint {
    /// Whose ledger (the signer).
    pub peer: PeerId,
    /// The row it pins.
    pub seq: u64,
    /// Unix seconds when it arrived.
    pub received_at: i64,
    /// The signed checkpoint as it arrived.
    pub checkpoint: SignedDocument,
}

/// What `hearth ledger witnesses` shows: the checkpoints that pin ledgers, both ways.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Witnesses {
    /// This agent.
    pub owner: PeerId,
    /// What each counterparty holds of this agent's ledger (asked now, through the network).
    pub of_this_ledger: Vec<WitnessAnswer>,
    /// What this agent holds of its counterparties' ledgers, oldest first by peer.
    pub held: Vec<HeldCheckpoint>,
}
