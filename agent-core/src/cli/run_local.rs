//! `hearth run JOB.toml --local`: one job under the sandbox, no daemon, output on the terminal.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use tokio::sync::mpsc;

use bytesize::ByteSize;
use hearth::config::Paths;
use hearth::jobs::{Control, EVENT_BUFFER, GpuDevice, GpuGrant, Job, JobSpec, RunEvent, Runner, Stream};
use hearth::resources::{self, Resources};

use super::terminal::{Decoder, Terminal, shown};

pub(crate) fn run(paths: &Paths, spec_path: &Path, terminal: Terminal) -> anyhow::Result<ExitCode> {
    let spec = JobSpec::load(spec_path)?;
    // Its size only: a usage sample would cost every local run 200 ms.
    let machine = resources::Detector::new().size(&paths.data_dir);
    fits(&spec, &machine)?;
    let gpus = grant_gpus(&machine, spec.resources.gpus)?;
    let runner = Runner::for_data_dir(&paths.data_dir);
    let id = format!("local-{}-{}", unix_seconds(), std::process::id());
    let request = Job { id: id.into(), spec, gpus };

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let outcome = runtime.block_on(async {
        let (control_tx, control_rx) = mpsc::channel(4);
        let (event_tx, mut event_rx) = mpsc::channel(EVENT_BUFFER);
        // A thread of its own: a terminal or pipe that stops reading slows the job's output (the
        // pumps wait for room), never the runtime that enforces the job's deadline and limits.
        let printer = tokio::task::spawn_blocking(move || {
            // Each stream decoded on its own, so a character cut between two reads stays whole.
            let (mut stdout, mut stderr) = (Decoder::default(), Decoder::default());
            while let Some(event) = event_rx.blocking_recv() {
                if let RunEvent::Output { stream, data } = event {
                    // A closed terminal must not stop the job; the logs keep everything.
                    let _ = match stream {
                        Stream::Stdout => {
                            write_out(&mut std::io::stdout().lock(), &mut stdout, terminal, stream, &data)
                        }
                        Stream::Stderr => {
                            write_out(&mut std::io::stderr().lock(), &mut stderr, terminal, stream, &data)
                        }
                    };
                }
            }
        });
        let cancel = tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = control_tx.send(Control::Cancel).await;
            }
        });
        let outcome = runner.run(request, control_rx, event_tx).await;
        cancel.abort();
        let _ = printer.await;
        outcome
    });
    let _ = std::io::stdout().flush();
    let out = outcome.job_dir.join("out");
    if std::fs::read_dir(&out).is_ok_and(|mut entries| entries.next().is_some()) {
        eprintln!("hearth: outputs are in {}", out.display());
    }
    Ok(super::jobs::exit_code(&outcome.state))
}

/// Whether this machine is large enough for what the job asks, at all: a job asking for more cores,
/// memory or disk than the machine has could never run as asked, so it is refused, naming the
/// machine's size.
fn fits(spec: &JobSpec, machine: &Resources) -> anyhow::Result<()> {
    let asked = &spec.resources;
    let cores = u64::from(machine.cpu.threads);
    if u64::from(asked.cpu_millis) > cores * 1000 {
        anyhow::bail!(
            "the job asks for {} cores and this machine has {cores}",
            f64::from(asked.cpu_millis) / 1000.0
        );
    }
    if asked.memory_bytes > machine.memory.total_bytes {
        anyhow::bail!(
            "the job asks for {} of memory and this machine has {}",
            ByteSize(asked.memory_bytes),
            ByteSize(machine.memory.total_bytes)
        );
    }
    if asked.disk_bytes > machine.disk.total_bytes {
        anyhow::bail!(
            "the job asks for {} of disk and this machine's data disk holds {}",
            ByteSize(asked.disk_bytes),
            ByteSize(machine.disk.total_bytes)
        );
    }
    Ok(())
}

/// The first `count` GPUs of this machine, or an error saying how many there are.
fn grant_gpus(machine: &Resources, count: u32) -> anyhow::Result<Vec<GpuGrant>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let found = &machine.gpus;
    let usable: Vec<GpuGrant> = found
        .iter()
        .filter_map(|gpu| {
            let device = GpuDevice::Node { minor_number: gpu.minor_number? };
            Some(GpuGrant { uuid: gpu.uuid.clone(), device })
        })
        .take(count as usize)
        .collect();
    if usable.len() < count as usize {
        anyhow::bail!("the job asks for {count} GPU(s) and this machine has {} usable", usable.len());
    }
    Ok(usable)
}

/// Seconds since the epoch: job ids only need to sort and not collide with the pid beside them.
fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs())
}

/// Writes what a job printed: its own bytes where `terminal` leaves the stream alone, else its
/// text made safe.
fn write_out(
    out: &mut impl Write,
    decoder: &mut Decoder,
    terminal: Terminal,
    stream: Stream,
    data: &[u8],
) -> std::io::Result<()> {
    if terminal.changes(stream) {
        out.write_all(shown(&decoder.push(data)).as_bytes())
    } else {
        out.write_all(data)
    }
}
