//! `hearth ledger verify`, `hearth ledger export`, `hearth ledger witnesses` and `hearth earnings`.
//!
//! Verify asks the running daemon, which also asks the agents it dealt with for the checkpoints
//! they hold of its ledger; without a daemon, or with `--db` or `--export`, it checks that file
//! alone (a copy, an export sent by someone else). Export reads the store file directly, read-only,
//! so it works with the daemon running or not, and signs the head with the data dir's key when
//! the ledger is its agent's; only the checkpoints its counterparties hold need the daemon.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use hearth::config::Paths;
use hearth::identity::Identity;
use hearth::ledger::verify::{ExportFormat, verify_export};
use hearth::ledger::{ExportExtras, Signed, export_file, held_in_file, verify_file};
use hearth_api::ledger::{Anchor, Earnings, Period, Report, SignedDocument, Totals, Witnessed, Witnesses};
use hearth_api::market::credits;
use hearth_api::{Client, ClientError};

use super::output;

/// The exit code of `hearth ledger verify` when what it was given is not a ledger at all: not an
/// export, not a store file, unreadable. A bad row exits 1.
const NOT_A_LEDGER: u8 = 2;

/// What to verify.
pub(super) enum Source {
    /// The agent's own ledger: through its daemon when one runs, else its store file.
    Agent,
    /// A store file (a copy, say).
    Db(PathBuf),
    /// A JSON Lines export; with `strict`, one without its owner's signed head fails.
    Export {
        /// The file.
        path: PathBuf,
        /// Whether an unsigned export fails.
        strict: bool,
    },
}

/// Verifies and prints the verdict: exit 0 when it holds, 1 when a row is bad (or, with
/// `--strict`, the export is unsigned), 2 when the input is not a ledger.
pub(super) async fn verify(paths: &Paths, source: Source, json: bool) -> anyhow::Result<ExitCode> {
    let not_a_ledger = |error: anyhow::Error| {
        eprintln!("hearth: {error:#}");
        Ok(ExitCode::from(NOT_A_LEDGER))
    };
    let mut strict = false;
    let (report, note) = match source {
        Source::Agent => match Client::discover(&paths.data_dir) {
            Ok(client) => match client.verify_ledger().await {
                Ok(report) => (report, None),
                Err(ClientError::NoDaemon { .. }) => match offline(&paths.store()) {
                    Ok(verdict) => verdict,
                    Err(error) => return not_a_ledger(error),
                },
                Err(error) => return Err(error.into()),
            },
            Err(ClientError::NoDaemon { .. }) => match offline(&paths.store()) {
                Ok(verdict) => verdict,
                Err(error) => return not_a_ledger(error),
            },
            Err(error) => return Err(error.into()),
        },
        Source::Db(path) => match verify_db(&path) {
            Ok(report) => (report, None),
            Err(error) => return not_a_ledger(error),
        },
        Source::Export { path, strict: wanted } => {
            strict = wanted;
            let read = File::open(&path)
                .with_context(|| format!("opening {}", path.display()))
                .and_then(|file| Ok(verify_export(BufReader::new(file), Vec::new())?));
            match read {
                Ok(report) => (report, None),
                Err(error) => {
                    return not_a_ledger(error.context(format!("{} is not a ledger export", path.display())));
                }
            }
        }
    };
    output::print(&report, json, human)?;
    if let Some(note) = note
        && !json
    {
        eprintln!("hearth: {note}");
    }
    let ok = if strict { report.ok_strict() } else { report.ok() };
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn offline(store: &Path) -> anyhow::Result<(Report, Option<&'static str>)> {
    Ok((verify_db(store)?, Some("no daemon is running: the checkpoints other agents hold were not asked")))
}

fn verify_db(path: &Path) -> anyhow::Result<Report> {
    if !path.is_file() {
        anyhow::bail!("no ledger at {}", path.display());
    }
    Ok(verify_file(path, Vec::new())?)
}

fn human(report: &Report) -> String {
    let mut text = format!(
        "ledger of {}: {} rows, {} countersigned receipts, head {}\n",
        report.owner,
        report.rows,
        report.receipts,
        report.head.as_deref().unwrap_or("(empty)")
    );
    for witness in &report.witnesses {
        let verdict = match witness.verdict {
            Witnessed::Matches => "matches",
            Witnessed::Truncated => "TRUNCATED",
            Witnessed::Forked => "REWRITTEN",
            Witnessed::Invalid => "invalid",
            Witnessed::None => "none held",
            Witnessed::Unreachable => "not reached",
        };
        text.push_str(&format!("  witness {}: {verdict} ({})\n", witness.peer, witness.detail));
    }
    for held in &report.held {
        let verdict = if held.verifies { "signed by it" } else { "DOES NOT VERIFY" };
        text.push_str(&format!("  holds {}'s checkpoint of row {}: {verdict}\n", held.peer, held.seq));
    }
    match report.anchor {
        Anchor::Store => {}
        Anchor::Signed => text.push_str("signed: the export ends with its owner's signed head of its last row\n"),
        Anchor::Unsigned => text.push_str(
            "UNSIGNED: the export has no signed head, so rows may have been cut from its end or unsigned rows \
             edited (--strict fails it)\n",
        ),
        Anchor::Invalid => {}
    }
    match &report.broken {
        None => text.push_str("intact: every row's hash, every link and every signature hold\n"),
        Some(broken) => text.push_str(&format!("broken at row {}: {}\n", broken.seq, broken.problem)),
    }
    text
}

/// Writes the ledger in the store file (`db`, else the agent's) to `out` or stdout, ending with
/// its signed head when this agent owns it; with `with_witnesses`, the checkpoints that pin it and
/// that it holds.
pub(super) async fn export(
    paths: &Paths,
    db: Option<PathBuf>,
    format: ExportFormat,
    out: Option<PathBuf>,
    with_witnesses: bool,
) -> anyhow::Result<()> {
    if with_witnesses && format != ExportFormat::Jsonl {
        anyhow::bail!("--with-witnesses needs --format jsonl: CSV holds rows alone");
    }
    let db = db.unwrap_or_else(|| paths.store());
    if !db.is_file() {
        anyhow::bail!("no ledger at {}", db.display());
    }
    let (owner, held) = held_in_file(&db, None)?;
    let identity = Identity::load(&paths.data_dir)?;
    let signer = identity.as_ref().filter(|identity| identity.peer_id().to_string() == owner);
    if signer.is_none() && format == ExportFormat::Jsonl {
        eprintln!(
            "hearth: the export will not be signed: {} is the ledger of {owner}, whose key is not in {}",
            db.display(),
            paths.data_dir.display()
        );
    }
    let mut extras = ExportExtras { signer, ..ExportExtras::default() };
    if with_witnesses {
        extras.witnesses = witnesses_of_this_ledger(paths, signer.is_some()).await?;
        extras.held = held.into_iter().map(|held| held.checkpoint.into()).collect();
    }
    let exported = match &out {
        Some(path) => {
            // Written beside its place and renamed, so a failed export leaves no half file.
            let dir = path.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let mut file = tempfile::NamedTempFile::new_in(dir)
                .with_context(|| format!("writing in {}", dir.display()))?;
            let exported = export_file(&db, format, &mut BufWriter::new(file.as_file_mut()), &extras)?;
            file.as_file().sync_all()?;
            file.persist(path).with_context(|| format!("writing {}", path.display()))?;
            exported
        }
        None => {
            let stdout = std::io::stdout().lock();
            let mut writer = BufWriter::new(stdout);
            let exported =
                export_file(&db, format, &mut writer, &extras).map_err(|e| output::closed_in(e.into()))?;
            writer.flush().map_err(output::closed)?;
            exported
        }
    };
    if let Some(path) = out {
        let signed = if exported.signed { ", signed" } else { "" };
        eprintln!("hearth: {} rows written to {}{signed}", exported.rows, path.display());
    }
    Ok(())
}

/// The checkpoints of this ledger its counterparties hold, for an export `--with-witnesses`: what
/// they answer through the running agent, when the ledger is this agent's own.
async fn witnesses_of_this_ledger(paths: &Paths, own: bool) -> anyhow::Result<Vec<(String, Signed)>> {
    if !own {
        return Ok(Vec::new());
    }
    let answers = match Client::discover(&paths.data_dir) {
        Ok(client) => match client.witnesses(None).await {
            Ok(witnesses) => witnesses.of_this_ledger,
            Err(ClientError::NoDaemon { .. }) => return Ok(not_asked()),
            Err(error) => return Err(error.into()),
        },
        Err(ClientError::NoDaemon { .. }) => return Ok(not_asked()),
        Err(error) => return Err(error.into()),
    };
    Ok(answers
        .into_iter()
        .filter_map(|answer| Some((answer.witness.to_string(), answer.checkpoint?.into())))
        .collect())
}

fn not_asked() -> Vec<(String, Signed)> {
    eprintln!(
        "hearth: no daemon is running: the checkpoints counterparties hold of this ledger were not asked"
    );
    Vec::new()
}

/// `hearth ledger witnesses [PEER]`: through the running agent, which asks its counterparties;
/// without one, only what the store holds of theirs.
pub(super) async fn witnesses(paths: &Paths, peer: Option<String>, json: bool) -> anyhow::Result<()> {
    let asked = match Client::discover(&paths.data_dir) {
        Ok(client) => match client.witnesses(peer.as_deref()).await {
            Ok(witnesses) => Some(witnesses),
            Err(ClientError::NoDaemon { .. }) => None,
            Err(error) => return Err(error.into()),
        },
        Err(ClientError::NoDaemon { .. }) => None,
        Err(error) => return Err(error.into()),
    };
    let witnesses = match asked {
        Some(witnesses) => witnesses,
        None => {
            let store = paths.store();
            if !store.is_file() {
                anyhow::bail!("no ledger at {}", store.display());
            }
            let (owner, held) = held_in_file(&store, peer.as_deref())?;
            if !json {
                eprintln!("hearth: no daemon is running: the checkpoints counterparties hold were not asked");
            }
            Witnesses { owner: owner.into(), of_this_ledger: Vec::new(), held }
        }
    };
    output::print(&witnesses, json, human_witnesses)
}

fn human_witnesses(witnesses: &Witnesses) -> String {
    let head = |document: &SignedDocument| {
        let field = |name: &str| document.body.get(name).map_or_else(|| "?".to_owned(), ToString::to_string);
        format!("row {} head {}", field("seq"), field("head").trim_matches('"'))
    };
    let mut text = format!("checkpoints of this ledger ({}) its counterparties hold:\n", witnesses.owner);
    if witnesses.of_this_ledger.is_empty() {
        text.push_str("  (none asked)\n");
    }
    for answer in &witnesses.of_this_ledger {
        let said = match (&answer.checkpoint, &answer.error) {
            (Some(checkpoint), _) => head(checkpoint),
            (None, Some(error)) => format!("not reached: {error}"),
            (None, None) => "holds none".to_owned(),
        };
        text.push_str(&format!("  {}  {said}\n", answer.witness));
    }
    text.push_str("checkpoints this agent holds of other ledgers:\n");
    if witnesses.held.is_empty() {
        text.push_str("  (none)\n");
    }
    for held in &witnesses.held {
        text.push_str(&format!("  {}  {}\n", held.peer, head(&held.checkpoint)));
    }
    text
}

/// `hearth earnings`.
pub(super) async fn earnings(client: &Client, by: Option<Period>, json: bool) -> anyhow::Result<()> {
    let earnings = client.earnings(by).await?;
    output::print(&earnings, json, human_earnings)
}

fn human_earnings(earnings: &Earnings) -> String {
    let total = &earnings.total;
    let mut text = format!(
        "earned {} credits from {} receipts; spent {} credits on {}\n",
        credits(total.earned.amount),
        total.earned.receipts,
        credits(total.spent.amount),
        total.spent.receipts
    );
    if earnings.periods.len() > 1 || earnings.periods.first().is_some_and(|p| p.period != "all") {
        text.push_str(&format!("\n{:<12} {:>14} {:>14}\n", "PERIOD", "EARNED", "SPENT"));
        for period in &earnings.periods {
            text.push_str(&format!(
                "{:<12} {:>14} {:>14}\n",
                period.period,
                credits(period.earned.amount),
                credits(period.spent.amount)
            ));
        }
    }
    for (side, totals) in [("earned", &total.earned), ("spent", &total.spent)] {
        if totals.receipts == 0 {
            continue;
        }
        text.push_str(&format!("\n{side} by kind: {}\n", by_kind(totals)));
        text.push_str(&format!("{side} by peer:\n"));
        for (peer, amount) in &totals.by_peer {
            text.push_str(&format!("  {peer}  {}\n", credits(*amount)));
        }
    }
    text
}

fn by_kind(totals: &Totals) -> String {
    let kinds = &totals.by_kind;
    format!("cpu {}, memory {}, gpu {}", credits(kinds.cpu), credits(kinds.memory), credits(kinds.gpu))
}
