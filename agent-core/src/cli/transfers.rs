//! Blob commands: `hearth blob add|get|cancel` and `hearth transfers`.
//!
//! `hearth blob get` starts a fetch in the daemon and follows it to its end, with a progress bar
//! on a terminal and nothing but the outcome otherwise; its exit code says how it ended.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};

use hearth_api::blob::{BlobHash, BlobRef, Format};
use hearth_api::transfer::{Fetch, FetchRequest, FetchState};
use hearth_api::{Client, Event};

use super::output;

/// What `hearth blob get` was asked.
pub(super) struct Get<'a> {
    pub(super) hash: &'a str,
    pub(super) folder: bool,
    pub(super) peer: &'a str,
    pub(super) out: Option<&'a Path>,
    pub(super) max_bytes: Option<u64>,
    pub(super) detach: bool,
    pub(super) json: bool,
}

/// `hearth blob add PATH [--share PEER]…`.
pub(super) async fn add(client: &Client, path: &Path, share: &[String], json: bool) -> anyhow::Result<()> {
    // Read here and sent by content: the daemon never reads a path this command names.
    let imported = client.add_blob(path, share).await?;
    for skipped in &imported.skipped {
        eprintln!("hearth: left out {skipped} (not a file or a folder)");
    }
    output::print(&imported, json, output::imported)
}

/// `hearth blob get HASH --from PEER`: starts the fetch, follows it, and ends with its outcome.
pub(super) async fn get(client: &Client, get: Get<'_>) -> anyhow::Result<ExitCode> {
    let hash: BlobHash = get.hash.parse().map_err(anyhow::Error::msg)?;
    let out = get.out.map(std::path::absolute).transpose()?;
    let request = FetchRequest {
        peer: get.peer.to_owned().into(),
        blob: BlobRef { hash, format: if get.folder { Format::Folder } else { Format::Raw } },
        max_bytes: get.max_bytes,
        out: out.clone(),
    };
    let fetch = client.fetch(&request).await?;
    // The id alone on stdout's first line, for scripts; the rest goes to stderr.
    if !get.json {
        output::out(&format!("{}\n", fetch.id))?;
    }
    if get.detach {
        if get.json {
            output::print(&fetch, true, output::fetch)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let fetch = follow(client, &fetch.id).await?;
    if get.json {
        output::print(&fetch, true, output::fetch)?;
    }
    Ok(outcome(&fetch, out.as_deref()))
}

/// Follows a fetch until it ends, drawing a progress bar when stderr is a terminal: it reads the
/// fetch again each time the daemon says it progressed (a few times a second) or ended.
async fn follow(client: &Client, id: &str) -> anyhow::Result<Fetch> {
    // Subscribed before the first read: no change after it goes unseen.
    let mut events = client.events().await?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{bytes:>10}/{total_bytes:10} {wide_bar} {bytes_per_sec:>12} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    loop {
        let fetch = client.transfer(id).await?;
        if let Some(bar) = &bar {
            bar.set_length(fetch.bytes_total.unwrap_or(0));
            bar.set_position(fetch.bytes_done);
        }
        if fetch.state.is_terminal() {
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            events.close().await;
            return Ok(fetch);
        }
        let wanted =
            |event: &Event| matches!(event, Event::TransferChanged { transfer } if transfer.id == id);
        if !events.changed(wanted).await? {
            anyhow::bail!("the daemon stopped before transfer {id} ended; it resumes when the daemon starts");
        }
    }
}

fn outcome(fetch: &Fetch, out: Option<&Path>) -> ExitCode {
    match fetch.state {
        FetchState::Finished => {
            let total = fetch.bytes_total.unwrap_or(fetch.bytes_done);
            let place = out.map_or_else(|| "in the blob store".to_owned(), |o| format!("in {}", o.display()));
            eprintln!(
                "hearth: {} verified, {} over the network, {place}",
                output::bytes(total),
                output::bytes(fetch.bytes_received)
            );
            ExitCode::SUCCESS
        }
        FetchState::Cancelled => {
            eprintln!("hearth: transfer cancelled");
            ExitCode::from(130)
        }
        _ => {
            eprintln!("hearth: transfer failed: {}", fetch.error.as_deref().unwrap_or("no reason given"));
            ExitCode::FAILURE
        }
    }
}

/// `hearth transfers`.
pub(super) async fn list(client: &Client, json: bool) -> anyhow::Result<()> {
    output::print(&client.transfers().await?, json, output::fetches)
}

/// `hearth blob cancel ID`.
pub(super) async fn cancel(client: &Client, id: &str) -> anyhow::Result<()> {
    client.cancel_transfer(id).await?;
    eprintln!("hearth: transfer {id} cancelled");
    Ok(())
}
