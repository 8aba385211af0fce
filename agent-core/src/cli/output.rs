//! How the CLI shows what it read: aligned `label  value` lines for people, or JSON with `--json`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use hearth_api::availability::{Availability, OwnerPause};
use hearth_api::blob::Format;
use hearth_api::jobs::{JobRecord, JobState, OwnerNotice};
use hearth_api::market::Offer;
use hearth_api::peers::{HolePunch, Path, PeerInfo, Reachability};
use hearth_api::policy::Policy;
use hearth_api::resources::{Gpu, Resources};
use hearth_api::status::{AgentStatus, LoginLink, Status};
use hearth_api::transfer::{Fetch, FetchState, Imported};

/// Stdout was closed by its reader (`hearth jobs | head -1`). The command stops at once and
/// `main` exits quietly: the reader has what it wanted.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
pub(crate) struct StdoutClosed;

/// Prints `value` as pretty JSON, or through `human` as text.
pub(super) fn print<T: Serialize>(value: &T, json: bool, human: fn(&T) -> String) -> anyhow::Result<()> {
    let text = if json { serde_json::to_string_pretty(value)? + "\n" } else { human(value) };
    out(&text)
}

/// Writes `text` to stdout and flushes it; a closed pipe is [`StdoutClosed`]. Every write to
/// stdout goes through here or [`out_bytes`]: `println!` would panic on a closed pipe.
pub(super) fn out(text: &str) -> anyhow::Result<()> {
    out_bytes(text.as_bytes())
}

/// [`out`] for bytes, such as a job's output.
pub(super) fn out_bytes(bytes: &[u8]) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(bytes).and_then(|()| stdout.flush()).map_err(closed)
}

/// An error from writing stdout, as [`StdoutClosed`] when the reader went away.
pub(super) fn closed(error: std::io::Error) -> anyhow::Error {
    if error.kind() == std::io::ErrorKind::BrokenPipe { StdoutClosed.into() } else { error.into() }
}

/// An error from a writer of stdout deeper down (an export), as [`StdoutClosed`] when any of its
/// causes is the reader going away.
pub(super) fn closed_in(error: anyhow::Error) -> anyhow::Error {
    let broken = error.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    });
    if broken { StdoutClosed.into() } else { error }
}

pub(super) fn status(s: &Status) -> String {
    let started = UNIX_EPOCH + Duration::from_secs(u64::try_from(s.started_at).unwrap_or(0));
    let state = match &s.availability {
        Availability::Paused { reasons } if s.state == AgentStatus::Paused => {
            let reasons: Vec<String> = reasons.iter().map(ToString::to_string).collect();
            format!("paused: {}", reasons.join("; "))
        }
        Availability::Sharing { capacity, .. } if s.state == AgentStatus::Sharing => format!(
            "sharing {:.1} cores, {} of memory{}",
            capacity.cpu_millis as f64 / 1000.0,
            bytes(capacity.memory_bytes),
            match capacity.gpus.len() {
                0 => String::new(),
                n => format!(", {n} GPU{}", if n == 1 { "" } else { "s" }),
            }
        ),
        _ => s.state.to_string(),
    };
    table(&[
        ("Peer ID", s.peer_id.to_string()),
        ("State", state),
        ("Reachable", reachable(s)),
        ("Version", s.version.clone()),
        ("Data dir", s.data_dir.display().to_string()),
        ("Running since", format!("{} (pid {})", humantime::format_rfc3339_seconds(started), s.pid)),
    ])
}

/// How other agents reach this one: directly, through relays, or not yet known.
fn reachable(s: &Status) -> String {
    let relays = s.listen_addrs.iter().filter(|a| a.contains("/p2p-circuit")).count();
    let through = match relays {
        0 => String::new(),
        1 => ", through 1 relay".to_owned(),
        n => format!(", through {n} relays"),
    };
    match s.reachability {
        Reachability::Public => "directly (public address)".to_owned(),
        Reachability::Private => format!("behind a NAT{through}"),
        Reachability::Unknown => format!("not tested yet{through}"),
    }
}

pub(super) fn resources(r: &Resources) -> String {
    let mut rows = vec![
        (
            "CPU",
            format!(
                "{}: {} cores, {} threads, {:.0}% busy",
                r.cpu.model, r.cpu.cores, r.cpu.threads, r.cpu.usage_percent
            ),
        ),
        (
            "Memory",
            format!("{} total, {} available", bytes(r.memory.total_bytes), bytes(r.memory.available_bytes)),
        ),
        (
            "Disk",
            format!(
                "{} total, {} free on {} (holds {})",
                bytes(r.disk.total_bytes),
                bytes(r.disk.free_bytes),
                r.disk.mount_point.display(),
                r.disk.path.display()
            ),
        ),
        (
            "OS",
            format!(
                "{} {}, kernel {}, {}, host {}",
                r.os.name, r.os.version, r.os.kernel, r.os.arch, r.os.hostname
            ),
        ),
    ];
    if r.gpus.is_empty() {
        rows.push(("GPUs", "none (no NVIDIA GPU or driver found)".to_owned()));
    }
    let mut out = table(&rows);
    for gpu in &r.gpus {
        let _ = writeln!(out, "GPU {:<10}  {}", gpu.index, describe_gpu(gpu));
    }
    out
}

fn describe_gpu(g: &Gpu) -> String {
    let mut parts = vec![
        format!("{} ({})", g.name, g.uuid),
        format!("{} VRAM, {} used", bytes(g.memory_total_bytes), bytes(g.memory_used_bytes)),
    ];
    if let Some(cc) = &g.compute_capability {
        parts.push(format!("compute {}.{}", cc.major, cc.minor));
    }
    if let Some(u) = &g.utilization {
        parts.push(format!("{}% busy", u.gpu_percent));
    }
    if let Some(t) = g.temperature_c {
        parts.push(format!("{t} °C"));
    }
    match (g.power_draw_w, g.power_limit_w) {
        (Some(draw), Some(limit)) => parts.push(format!("{draw:.0}/{limit:.0} W")),
        (Some(draw), None) => parts.push(format!("{draw:.0} W")),
        _ => {}
    }
    if let Some(mig) = &g.mig_mode {
        parts.push(format!("MIG {}", if mig.current { "on" } else { "off" }));
    }
    parts.push(format!("{} processes", g.processes.len()));
    parts.join(", ")
}

fn table(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(label, _)| label.len()).max().unwrap_or(0);
    rows.iter().fold(String::new(), |mut out, (label, value)| {
        let _ = writeln!(out, "{label:<width$}  {value}");
        out
    })
}

/// Bytes in binary units with one decimal, as `free -h` shows them.
pub(super) fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// One job, as `hearth job cancel|pause|resume` shows it.
pub(super) fn job(job: &JobRecord) -> String {
    format!("{} {}\n", job.id, state_text(&job.state))
}

/// The `hearth jobs` table: one line per job, newest last.
pub(super) fn jobs(jobs: &Vec<JobRecord>) -> String {
    if jobs.is_empty() {
        return "No jobs yet.\n".to_owned();
    }
    let mut text = format!("{:<12}  {:<6}  {:<20}  {}\n", "ID", "KIND", "CREATED", "STATE");
    for job in jobs {
        let created = UNIX_EPOCH + Duration::from_secs(u64::try_from(job.created_at).unwrap_or(0));
        let _ = writeln!(
            text,
            "{:<12}  {:<6}  {:<20}  {}",
            job.id,
            job.kind,
            humantime::format_rfc3339_seconds(created).to_string(),
            state_text(&job.state)
        );
    }
    text
}

fn state_text(state: &JobState) -> String {
    match state {
        JobState::Finished { exit_code } => format!("finished (exit {exit_code})"),
        JobState::Failed { reason } => format!("failed: {reason}"),
        other => other.name().to_owned(),
    }
}

pub(super) fn login_link(link: &LoginLink) -> String {
    format!("Open this link in a browser on this machine; it works once, within a minute:\n{}\n", link.url)
}

pub(super) fn pause(p: &OwnerPause) -> String {
    match p.until {
        Some(until) => format!("sharing paused until {until}\n"),
        None => "sharing paused until `hearth resume`\n".to_owned(),
    }
}

pub(super) fn policy(p: &Policy) -> String {
    toml::to_string_pretty(p).unwrap_or_else(|error| format!("cannot show the policy: {error}\n"))
}

pub(super) fn notices(notices: &Vec<OwnerNotice>) -> String {
    if notices.is_empty() {
        return "no notices yet about this job\n".to_owned();
    }
    let mut text = String::new();
    for notice in notices {
        let at = UNIX_EPOCH + Duration::from_secs(u64::try_from(notice.at).unwrap_or(0));
        let _ =
            writeln!(text, "{}  {:<8} {}", humantime::format_rfc3339_seconds(at), notice.kind, notice.reason);
    }
    text
}

#[expect(clippy::ptr_arg, reason = "`print` hands every formatter a `&T`; here T is the Vec it prints")]
pub(super) fn peers(peers: &Vec<PeerInfo>) -> String {
    if peers.is_empty() {
        return "no peers connected\n".to_owned();
    }
    peers.iter().map(peer).collect()
}

/// One line: id, round trip, path (and how a hole punch went), addresses.
pub(super) fn peer(peer: &PeerInfo) -> String {
    let rtt = peer.rtt_us.map_or("-".to_owned(), |us| format!("{:.1} ms", us as f64 / 1000.0));
    let path = match (&peer.path, &peer.hole_punch) {
        (Path::Direct, Some(HolePunch::Succeeded)) => "direct (hole punched)".to_owned(),
        (Path::Direct, _) => "direct".to_owned(),
        (Path::Relayed, Some(HolePunch::Failed { reason })) => {
            format!("relayed (hole punch failed: {reason})")
        }
        (Path::Relayed, _) => "relayed".to_owned(),
    };
    format!("{}  {:>9}  {}  {}\n", peer.peer_id, rtt, path, peer.addresses.join(" "))
}

pub(super) fn offers(offers: &Vec<Offer>) -> String {
    if offers.is_empty() {
        return "no offers known\n".to_owned();
    }
    let mut text = String::new();
    for offer in offers {
        let until = UNIX_EPOCH + Duration::from_secs(u64::try_from(offer.expires_at).unwrap_or(0));
        let what = if offer.state == "sharing" {
            let gpus: Vec<String> =
                offer.free.gpus.iter().map(|g| format!("{} ({})", g.model, bytes(g.memory_bytes))).collect();
            format!(
                "{:.1} cores, {} memory, {} disk{}{}",
                offer.free.cpu_millis as f64 / 1000.0,
                bytes(offer.free.memory_bytes),
                bytes(offer.free.disk_bytes),
                if gpus.is_empty() { "" } else { ", " },
                gpus.join(", ")
            )
        } else {
            format!("paused: {}", offer.paused_because.join("; "))
        };
        let _ =
            writeln!(text, "{}  {}  until {}", offer.peer_id, what, humantime::format_rfc3339_seconds(until));
    }
    text
}

pub(super) fn imported(i: &Imported) -> String {
    let what = match i.blob.format {
        Format::Raw => format!("{} file", bytes(i.size)),
        Format::Folder => format!("folder: {} files, {}", i.files, bytes(i.size)),
    };
    format!("{}  {what}\n", i.blob.hash)
}

#[expect(clippy::ptr_arg, reason = "`print` hands every formatter a `&T`; here T is the Vec it prints")]
pub(super) fn fetches(fetches: &Vec<Fetch>) -> String {
    if fetches.is_empty() {
        return "no transfers\n".to_owned();
    }
    fetches.iter().map(fetch).collect()
}

/// One line: id, state, progress, what, from whom, and why it failed.
pub(super) fn fetch(f: &Fetch) -> String {
    let progress = match (f.state, f.bytes_total) {
        (FetchState::Running, Some(total)) if total > 0 => format!(
            "{} of {} ({:.0}%), {}/s",
            bytes(f.bytes_done),
            bytes(total),
            f.bytes_done as f64 * 100.0 / total as f64,
            bytes(f.rate_bytes_per_s)
        ),
        (_, Some(total)) => bytes(total),
        (_, None) => bytes(f.bytes_done),
    };
    let what = match f.blob.format {
        Format::Raw => f.blob.hash.to_string(),
        Format::Folder => format!("folder {}", f.blob.hash),
    };
    let state = match (&f.state, &f.error) {
        (FetchState::Failed, Some(error)) => format!("failed: {error}"),
        (state, _) => state.name().to_owned(),
    };
    format!("{}  {}  {what}  from {}  {state}\n", f.id, progress, f.peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_like_free_h() {
        for (n, text) in [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (80 * (1 << 30), "80.0 GiB")] {
            assert_eq!(bytes(n), text);
        }
    }
}
