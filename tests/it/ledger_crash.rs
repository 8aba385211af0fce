//! The ledger under SIGKILL: a writer appending countersigned receipts as fast as it can is killed
//! at a random moment, again and again on the same file, and after every kill the file must be an
//! intact SQLite database whose chain verifies and which holds every receipt the writer had
//! acknowledged (printed after `append_receipt` returned). A lost acknowledged receipt is money a
//! provider was told it had earned and then did not have.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};

/// Kills, alternating realtime and batch mode.
const ROUNDS: usize = 25;
/// The longest a writer may take to acknowledge its first receipt (a debug build on a busy machine).
const FIRST_ACK: Duration = Duration::from_secs(20);

/// The `ledger-writer` program (tests/src/bin/ledger-writer.rs). Cargo builds a package's programs
/// before its integration tests and names them at compile time; a nested `cargo build`, as for
/// `job-probe`, would inherit this test's `CARGO_MANIFEST_DIR` and `CARGO_PKG_NAME` and so rebuild
/// ring (whose build script watches them) twice a run.
pub(crate) fn writer_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ledger-writer"))
}

/// xorshift64*: enough to spread the kills, and reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

pub(crate) fn kill_9_during_appends_loses_no_acknowledged_receipt() -> Result<()> {
    let writer = writer_bin();
    let seed = std::env::var("HEARTH_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1
    });
    eprintln!("ledger_crash: seed {seed} (HEARTH_CRASH_SEED={seed} repeats these kills)");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("hearth.db");
    let keys = dir.path().join("keys");
    let mut acknowledged: Vec<u64> = Vec::new();
    for round in 0..ROUNDS {
        let mode = if round % 2 == 0 { "realtime" } else { "batch" };
        let delay = Duration::from_millis(rng.between(2, 150));
        let mut child = Command::new(&writer)
            .arg(&db)
            .arg(&keys)
            .arg(mode)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting ledger-writer")?;
        let stdout = child.stdout.take().context("no stdout")?;
        // Whole lines only: a number cut off by the kill was never acknowledged.
        let (lines, acks) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            let mut line = String::new();
            while stdout.read_line(&mut line).is_ok_and(|n| n > 0) {
                if line.ends_with('\n') && lines.send(line.trim_end().to_owned()).is_err() {
                    break;
                }
                line.clear();
            }
        });
        // The kill lands while receipts are being appended, not while the store opens.
        let first = acks.recv_timeout(FIRST_ACK);
        if first.is_ok() {
            std::thread::sleep(delay);
        }
        // SIGKILL, even when it never acknowledged anything (then say why below).
        child.kill()?;
        let status = child.wait()?;
        let _ = reader.join();
        let mut round_acks = Vec::new();
        for line in first.into_iter().chain(acks.try_iter()) {
            round_acks.push(line.parse::<u64>().with_context(|| format!("round {round}: printed {line:?}"))?);
        }
        if round_acks.is_empty() {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                std::io::Read::read_to_string(&mut pipe, &mut stderr)?;
            }
            let stderr: String = stderr.lines().take(20).collect::<Vec<_>>().join("\n");
            bail!(
                "round {round} ({mode}): no receipt acknowledged within {FIRST_ACK:?} ({status}): {stderr}"
            );
        }
        ensure!(
            round_acks.windows(2).all(|pair| pair[0] < pair[1]),
            "round {round}: acknowledged sequence numbers do not increase: {round_acks:?}"
        );
        if let (Some(previous), Some(first)) = (acknowledged.last(), round_acks.first()) {
            ensure!(first > previous, "round {round} acknowledged {first}, not after {previous}");
        }
        let last = round_acks.last().copied().unwrap_or_default();
        acknowledged.extend(&round_acks);
        let rows = check_file(&db, &acknowledged).with_context(|| {
            format!(
                "after the kill in round {round} ({mode}, {delay:?} after the first ack, last ack {last})"
            )
        })?;
        ensure!(rows >= last, "round {round}: {rows} rows, but seq {last} was acknowledged");
        eprintln!(
            "ledger_crash: round {round:2} {mode:8} killed {delay:>6.0?} after the first ack: {} acked, last {last}, {rows} rows on disk",
            round_acks.len()
        );
    }
    Ok(())
}

/// Everything a kill must not break; the number of rows in the chain.
fn check_file(db: &Path, acknowledged: &[u64]) -> Result<u64> {
    {
        let conn = rusqlite::Connection::open(db)?;
        let integrity: String = conn.query_row("PRAGMA integrity_check", [], |row| row.get(0))?;
        ensure!(integrity == "ok", "PRAGMA integrity_check: {integrity}");
        let (rows, last): (i64, Option<i64>) =
            conn.query_row("SELECT count(*), max(seq) FROM ledger", [], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?;
        ensure!(last.unwrap_or(0) == rows, "{rows} rows but the last is {last:?}: a gap");
        let mut statement = conn.prepare("SELECT seq FROM ledger WHERE kind = 'receipt'")?;
        let receipts: HashSet<i64> = statement.query_map([], |row| row.get(0))?.collect::<Result<_, _>>()?;
        let lost: Vec<u64> = acknowledged
            .iter()
            .copied()
            .filter(|&seq| !i64::try_from(seq).is_ok_and(|seq| receipts.contains(&seq)))
            .collect();
        ensure!(lost.is_empty(), "acknowledged receipts missing or not receipts: {lost:?}");
    }
    let started = Instant::now();
    let report = hearth::ledger::verify_file(db, Vec::new())?;
    if let Some(broken) = &report.broken {
        bail!("verify names row {}: {} (of {} rows)", broken.seq, broken.problem, report.rows);
    }
    ensure!(
        report.receipts >= acknowledged.len() as u64,
        "verify counted {} receipts, {} were acknowledged",
        report.receipts,
        acknowledged.len()
    );
    if started.elapsed() > Duration::from_secs(5) {
        eprintln!("ledger_crash: verifying {} rows took {:?}", report.rows, started.elapsed());
    }
    Ok(report.rows)
}
