//! `hearth ledger verify`, `hearth ledger export` and `hearth earnings`.
//!
//! Verify asks the running daemon, which also asks the agents it dealt with for the checkpoints
//! they hold of its ledger; without a daemon, or with `--db` or `--export`, it checks that file
//! alone (a copy, an export sent by someone else). Export reads the store file directly, read-only,
//! so it works with the daemon running or not.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use hearth::config::Paths;
use hearth::ledger::verify::{ExportFormat, verify_export};
use hearth::ledger::{export_file, verify_file};
use hearth_api::ledger::{Earnings, Period, Report, Totals, Witnessed};
use hearth_api::market::credits;
use hearth_api::{Client, ClientError};

use super::output;

/// What to verify.
pub(super) enum Source {
    /// The agent's own ledger: through its daemon when one runs, else its store file.
    Agent,
    /// A store file (a copy, say).
    Db(PathBuf),
    /// A JSON Lines export.
    Export(PathBuf),
}

/// Verifies and prints the verdict; exit 1 when a row is bad.
pub(super) async fn verify(paths: &Paths, source: Source, json: bool) -> anyhow::Result<ExitCode> {
    let (report, note) = match source {
        Source::Agent => match Client::discover(&paths.data_dir) {
            Ok(client) => match client.verify_ledger().await {
                Ok(report) => (report, None),
                Err(ClientError::NoDaemon { .. }) => offline(&paths.store())?,
                Err(error) => return Err(error.into()),
            },
            Err(ClientError::NoDaemon { .. }) => offline(&paths.store())?,
            Err(error) => return Err(error.into()),
        },
        Source::Db(path) => (verify_db(&path)?, None),
        Source::Export(path) => {
            let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            (verify_export(BufReader::new(file), Vec::new())?, None)
        }
    };
    output::print(&report, json, human)?;
    if let Some(note) = note
        && !json
    {
        eprintln!("hearth: {note}");
    }
    Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
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
    match &report.broken {
        None => text.push_str("intact: every row's hash, every link and every signature hold\n"),
        Some(broken) => text.push_str(&format!("broken at row {}: {}\n", broken.seq, broken.problem)),
    }
    text
}

/// Writes the ledger in the store file (`db`, else the agent's) to `out` or stdout.
pub(super) fn export(
    paths: &Paths,
    db: Option<PathBuf>,
    format: ExportFormat,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    let db = db.unwrap_or_else(|| paths.store());
    if !db.is_file() {
        anyhow::bail!("no ledger at {}", db.display());
    }
    let rows = match &out {
        Some(path) => {
            // Written beside its place and renamed, so a failed export leaves no half file.
            let dir = path.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let mut file = tempfile::NamedTempFile::new_in(dir)
                .with_context(|| format!("writing in {}", dir.display()))?;
            let rows = export_file(&db, format, &mut BufWriter::new(file.as_file_mut()))?;
            file.as_file().sync_all()?;
            file.persist(path).with_context(|| format!("writing {}", path.display()))?;
            rows
        }
        None => {
            let stdout = std::io::stdout().lock();
            let mut writer = BufWriter::new(stdout);
            let rows = export_file(&db, format, &mut writer).map_err(|e| output::closed_in(e.into()))?;
            writer.flush().map_err(output::closed)?;
            rows
        }
    };
    if let Some(path) = out {
        eprintln!("hearth: {rows} rows written to {}", path.display());
    }
    Ok(())
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
