//! The `hearth` command line: parsing, then a thin call into the daemon or the control API.
//!
//! Every command but `daemon` and `resources` is a client of a running daemon, found through the
//! data dir (see `hearth::api::client`). `resources` reads the machine in-process on purpose, so it
//! works without a daemon. Errors travel up as `anyhow` to `main`, which prints them on one line
//! and exits non-zero: this module belongs to the binary, the edge where `anyhow` is allowed.

mod jobs;
mod ledger;
pub(crate) mod output;
mod packages;
mod remote;
mod run_local;
mod terminal;
mod transfers;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use hearth::availability::MAX_PAUSE;
use hearth::config::{HearthConfig, LOG_LEVELS, Overrides, Paths};
use hearth::ledger::verify::ExportFormat;
use hearth::resources::{self, nvidia};
use hearth_api::Client;
use hearth_api::jobs::{JobAction, Stream};
use hearth_api::ledger::Period;
use hearth_api::policy::Policy;

/// Hearth: lend your idle GPUs and CPUs, and borrow others', with no company in the middle.
#[derive(Debug, Parser)]
#[command(name = "hearth", version, propagate_version = true, max_term_width = 100)]
pub(crate) struct Cli {
    /// Keep everything of this agent under DIR (identity, store, config, API files).
    #[arg(long, global = true, env = "HEARTH_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Read the configuration from FILE instead of the default place.
    #[arg(long, global = true, env = "HEARTH_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log level: error, warn, info, debug or trace (wins over RUST_LOG and the config file).
    #[arg(long, global = true, value_name = "LEVEL", value_parser = clap::builder::PossibleValuesParser::new(LOG_LEVELS))]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent in the foreground (SIGTERM or Ctrl-C stops it cleanly).
    Daemon(DaemonArgs),
    /// Show the running agent's identity and state.
    Status(ReadArgs),
    /// Show this machine's CPU, memory, disk and GPUs (works without a daemon).
    Resources(ResourcesArgs),
    /// Run a job spec on this machine in the sandbox; the job's output goes to the terminal and
    /// the exit code is the job's.
    Run(RunArgs),
    /// Find the agent whose idle capacity fits a job spec best and run the job there, or acquire
    /// every resource of a request package and run its tasks; prints the request id at once
    /// (alone on stdout's first line).
    Submit(SubmitArgs),
    /// Follow request packages: their resources, their tasks, and how many succeeded or failed.
    #[command(subcommand)]
    Request(RequestCommand),
    /// List the resources this agent holds for other agents' request packages.
    Reservations(ReadArgs),
    /// List the jobs the running agent has run or is running, and the ones it asked others to run.
    Jobs(ReadArgs),
    /// Follow or control one job of the running agent.
    #[command(subcommand)]
    Job(JobCommand),
    /// List the peers this agent is connected to, with their addresses and latency.
    Peers(ReadArgs),
    /// Connect to a peer by its id (found through the network, through its relay if it is behind
    /// a NAT) or by a multiaddr ending in /p2p/PEER_ID; shows whether the path is direct.
    Connect(ConnectArgs),
    /// List the capacity adverts this agent knows: what each agent offers and until when.
    Offers(ReadArgs),
    /// Sign a browser on this machine in to this agent: prints a one-time login link (it works
    /// once, within a minute) and opens it in the desktop's browser where there is one.
    Ui(UiArgs),
    /// Stop sharing now: every running job is frozen at once.
    Pause(PauseArgs),
    /// End `hearth pause`; sharing resumes unless the policy says otherwise.
    Resume(ReadArgs),
    /// Show or replace the sharing policy (windows, idle time, power, temperatures, reserves).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Put files in this agent's blob store for peers, and fetch blobs from peers.
    #[command(subcommand)]
    Blob(BlobCommand),
    /// List this agent's fetches: progress, rate, and how each ended.
    Transfers(ReadArgs),
    /// Check or export the ledger: the signed record of every dealing with other agents.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Credits earned as a provider and spent as a consumer, from the countersigned receipts.
    Earnings {
        /// Group by UTC day, ISO week or month.
        #[arg(long, value_enum)]
        by: Option<Period>,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Put an ended job's outputs in a folder (by default ./results-ID).
    Results {
        /// The job's id, as `hearth jobs` shows it.
        id: String,
        /// The folder to fill; it must not exist or be empty.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        #[command(flatten)]
        read: ReadArgs,
    },
}

#[derive(Debug, Subcommand)]
enum RequestCommand {
    /// A request's progress: each resource (held where, tries, why not) and each task, with how
    /// many succeeded and failed and why; a job submitted alone shows as a package of one.
    Status {
        /// The request id `hearth submit` printed.
        id: String,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Every request package of this agent.
    List(ReadArgs),
}

#[derive(Debug, Subcommand)]
enum LedgerCommand {
    /// Check every row's hash and link and every signature, and (through the running agent) the
    /// checkpoints of this ledger that other agents hold; names the first bad row and exits 1.
    Verify {
        /// Check this store file instead (a copy, say), without a daemon.
        #[arg(long, value_name = "FILE", conflicts_with = "export")]
        db: Option<PathBuf>,
        /// Check this JSON Lines export instead, from the file alone.
        #[arg(long, value_name = "FILE")]
        export: Option<PathBuf>,
        /// Fail (exit 1) unless the export ends with its owner's signed head, which shows that no
        /// rows were cut from its end and no unsigned row was edited.
        #[arg(long, requires = "export")]
        strict: bool,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Write the ledger out, a header line then one row per line (see docs/ledger.md).
    Export {
        /// `jsonl` (verifiable) or `csv` (for spreadsheets).
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        /// Write to FILE instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Export this store file instead of the agent's (its head is signed only if it is this
        /// agent's ledger).
        #[arg(long, value_name = "FILE")]
        db: Option<PathBuf>,
        /// Add the checkpoints of this ledger its counterparties hold (asked through the running
        /// agent) and the ones this agent holds of theirs.
        #[arg(long)]
        with_witnesses: bool,
    },
    /// The signed checkpoints that pin ledgers: what each counterparty holds of this ledger
    /// (asked now, through the running agent), and what this agent holds of theirs.
    Witnesses {
        /// Only this peer's.
        peer: Option<String>,
        #[command(flatten)]
        read: ReadArgs,
    },
}

#[derive(Debug, Subcommand)]
enum BlobCommand {
    /// Put a file or a folder in the blob store and print its hash; --share lets a peer fetch it.
    Add {
        /// The file or folder.
        path: PathBuf,
        /// A peer id allowed to fetch it (repeatable).
        #[arg(long, value_name = "PEER")]
        share: Vec<String>,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Fetch a blob (or with --folder a folder) from a peer, verified as it arrives; an
    /// interrupted fetch resumes where it stopped. Prints the transfer id first.
    Get {
        /// The blob's hash, as `hearth blob add` printed it.
        hash: String,
        /// The hash names a folder.
        #[arg(long)]
        folder: bool,
        /// The peer that holds it.
        #[arg(long = "from", value_name = "PEER")]
        peer: String,
        /// Write the file (or folder, which must not exist or be empty) here when it is complete.
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
        /// Refuse a blob larger than this, such as `2GiB`.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_size: Option<u64>,
        /// Start the fetch and return; `hearth transfers` follows it.
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Cancel a fetch; what it downloaded is dropped.
    Cancel {
        /// The transfer id.
        id: String,
    },
}

fn parse_size(text: &str) -> Result<u64, String> {
    text.parse::<bytesize::ByteSize>().map(|size| size.as_u64()).map_err(|e| format!("{text:?}: {e}"))
}

#[derive(Debug, Args)]
struct ConnectArgs {
    /// A peer id, or a multiaddr ending in /p2p/PEER_ID.
    #[arg(value_name = "PEER")]
    target: String,
    #[command(flatten)]
    read: ReadArgs,
}

#[derive(Debug, Args)]
struct PauseArgs {
    /// End the pause by itself after this long, such as `30m` or `2h`.
    #[arg(long = "for", value_name = "DURATION", value_parser = humantime::parse_duration)]
    length: Option<std::time::Duration>,
    #[command(flatten)]
    read: ReadArgs,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Print the policy in force, every default filled in.
    Show(ReadArgs),
    /// Check FILE and make it the policy; a running agent applies it at once. An invalid file
    /// changes nothing and the error names the field.
    Set {
        /// The new policy (TOML).
        #[arg(value_name = "FILE.toml")]
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum JobCommand {
    /// Print a job's output (stdout and stderr, or one of them).
    Logs {
        /// The job's id, as `hearth jobs` shows it.
        id: String,
        /// Keep printing until the job ends.
        #[arg(short, long)]
        follow: bool,
        /// Only this stream.
        #[arg(long, value_parser = ["stdout", "stderr"])]
        stream: Option<String>,
        /// Print the output as it is, escape sequences included, even to a terminal.
        #[arg(long)]
        raw: bool,
    },
    /// Stop a job for good; nothing of it keeps running.
    Cancel(JobIdArgs),
    /// Freeze every process of a job.
    Pause(JobIdArgs),
    /// Let a paused job run again.
    Resume(JobIdArgs),
    /// What the owner did to a job (paused, resumed, stopped) and why, as kept for its consumer;
    /// for a job run elsewhere, the provider's signed notices of its states.
    Notices(JobIdArgs),
}

#[derive(Debug, Args)]
struct JobIdArgs {
    /// The job's id, as `hearth jobs` shows it.
    id: String,
    #[command(flatten)]
    read: ReadArgs,
}

#[derive(Debug, Args)]
struct SubmitArgs {
    /// The job spec or request package (TOML).
    #[arg(value_name = "JOB_OR_PACKAGE.toml")]
    spec: PathBuf,
    /// Follow the job (or package) to its end, changes on stderr; exit with the job's exit code
    /// (a package: 0 when every task succeeded).
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    read: ReadArgs,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The job spec (TOML).
    #[arg(value_name = "JOB.toml")]
    spec: PathBuf,
    /// Run here without a daemon (and so with no network at all); without it the running agent
    /// runs the job and it shows in `hearth jobs`.
    #[arg(long)]
    local: bool,
    /// Print the job's output as it is, escape sequences included, even to a terminal.
    #[arg(long)]
    raw: bool,
}

#[derive(Debug, Args)]
struct DaemonArgs {
    /// Port of the control API on 127.0.0.1; 0 picks any free port.
    #[arg(long, env = "HEARTH_API_PORT", value_name = "N")]
    api_port: Option<u16>,
    /// Accept peers on this multiaddr (repeatable; replaces `network.listen`).
    #[arg(long, value_name = "MULTIADDR")]
    listen: Vec<String>,
    /// Meet this agent first, a multiaddr ending in /p2p/PEER_ID (repeatable; adds to
    /// `network.bootstrap`). `hearth status` prints an agent's own.
    #[arg(long, value_name = "MULTIADDR")]
    bootstrap: Vec<String>,
    /// Also relay for agents behind NAT and serve as a bootstrap node.
    #[arg(long)]
    relay: bool,
    /// Meet no agent on the local network by mDNS: only the bootstrap agents and whom they
    /// introduce (overrides `network.mdns`).
    #[arg(long, env = "HEARTH_NO_MDNS")]
    no_mdns: bool,
}

#[derive(Debug, Args)]
struct UiArgs {
    /// Only print the link; do not start a browser.
    #[arg(long)]
    no_open: bool,
    #[command(flatten)]
    read: ReadArgs,
}

#[derive(Debug, Args)]
struct ReadArgs {
    /// Print machine-readable JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ResourcesArgs {
    #[command(flatten)]
    read: ReadArgs,
    /// Write NVML's raw readings of every GPU to FILE, as a test fixture.
    #[arg(long, value_name = "FILE", hide = true)]
    record_nvml: Option<PathBuf>,
}

/// Parses the command line and runs the command. Returns the process exit code.
pub(crate) fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let paths = Paths::resolve(cli.data_dir.clone(), cli.config.clone())?;
    match cli.command {
        Command::Daemon(args) => {
            let overrides = Overrides {
                api_port: args.api_port,
                log_level: cli.log_level,
                listen: args.listen,
                bootstrap: args.bootstrap,
                relay: args.relay,
                no_mdns: args.no_mdns,
            };
            let config = HearthConfig::load(&paths.config_file, &overrides)?;
            init_logging(Some(&config.log.level), overrides.log_level.is_some());
            runtime(true)?.block_on(hearth::daemon::run(&paths, &config))?;
        }
        Command::Status(args) => {
            init_logging(cli.log_level.as_deref(), cli.log_level.is_some());
            let status =
                runtime(false)?.block_on(async { Client::discover(&paths.data_dir)?.status().await })?;
            output::print(&status, args.json, output::status)?;
        }
        Command::Resources(args) => {
            init_logging(cli.log_level.as_deref(), cli.log_level.is_some());
            if let Some(file) = args.record_nvml {
                let fixture = nvidia::record_fixture()?;
                std::fs::write(&file, fixture).with_context(|| format!("writing {}", file.display()))?;
                return Ok(ExitCode::SUCCESS);
            }
            let resources = resources::detect(&paths.data_dir);
            output::print(&resources, args.read.json, output::resources)?;
        }
        Command::Run(args) => {
            init_logging(cli.log_level.as_deref(), cli.log_level.is_some());
            let terminal = terminal::Terminal::detect(args.raw);
            if args.local {
                return run_local::run(&paths, &args.spec, terminal);
            }
            return runtime(false)?.block_on(async {
                jobs::run(&Client::discover(&paths.data_dir)?, &args.spec, terminal).await
            });
        }
        Command::Submit(args) => {
            init_logging(cli.log_level.as_deref(), cli.log_level.is_some());
            return runtime(false)?.block_on(async {
                remote::submit(&Client::discover(&paths.data_dir)?, &args.spec, args.wait, args.read.json)
                    .await
            });
        }
        Command::Request(command) => {
            init_logging(cli.log_level.as_deref(), cli.log_level.is_some());
            runtime(false)?.block_on(async {
                let client = Client::discover(&paths.data_dir)?;
                match command {
                    RequestCommand::Status { id, read } => packages::status(&client, &id, read.json).await,
                    RequestCommand::List(read) => packages::list(&client, read.json).await,
                }
            })?;
        }
        Command::Reservations(args) => {
            init_logging(cli.log_level.as_deref(), cli.log_level.is_some());
            runtime(false)?.block_on(async {
                packages::reservations(&Client::discover(&paths.data_dir)?, args.json).await
            })?;
        }
        Command::Jobs(args) => {
            init_logging(cli.log_level.as_deref(), cli.log_level.is_some());
            runtime(false)?
                .block_on(async { remote::list(&Client::discover(&paths.data_dir)?, args.json).await })?;
        }
        Command::Job(command) => {
            init_logging(cli.log_level.as_deref(), cli.log_level.is_some());
            runtime(false)?.block_on(async {
                let client = Client::discover(&paths.data_dir)?;
                match command {
                    JobCommand::Logs { id, follow, stream, raw } => {
                        let terminal = terminal::Terminal::detect(raw);
                        let streams = match stream.as_deref() {
                            Some("stdout") => vec![Stream::Stdout],
                            Some(_) => vec![Stream::Stderr],
                            None => vec![Stream::Stdout, Stream::Stderr],
                        };
                        match remote::locate(&client, &id).await? {
                            remote::Where::Here => {
                                jobs::follow(&client, &id, &streams, follow, terminal).await.map(drop)
                            }
                            remote::Where::Remote => {
                                remote::logs(&client, &id, &streams, follow, terminal).await
                            }
                        }
                    }
                    JobCommand::Cancel(args) => match remote::locate(&client, &args.id).await? {
                        remote::Where::Here => {
                            jobs::act(&client, &args.id, JobAction::Cancel, args.read.json).await
                        }
                        remote::Where::Remote => remote::cancel(&client, &args.id, args.read.json).await,
                    },
                    JobCommand::Pause(args) => {
                        jobs::act(&client, &args.id, JobAction::Pause, args.read.json).await
                    }
                    JobCommand::Resume(args) => {
                        jobs::act(&client, &args.id, JobAction::Resume, args.read.json).await
                    }
                    JobCommand::Notices(args) => {
                        let notices = match remote::locate(&client, &args.id).await? {
                            remote::Where::Here => client.notices(&args.id).await?,
                            remote::Where::Remote => client.remote_notices(&args.id).await?,
                        };
                        output::print(&notices, args.read.json, output::notices)
                    }
                }
            })?;
        }
        Command::Peers(args) => {
            init_logging(cli.log_level.as_deref(), cli.log_level.is_some());
            let peers =
                runtime(false)?.block_on(async { Client::discover(&paths.data_dir)?.peers().await })?;
            output::print(&peers, args.json, output::peers)?;
        }
        Command::Connect(args) => {
            init_logging(cli.log_level.as_deref(), cli.log_level.is_some());
            let peer = runtime(false)?
                .block_on(async { Client::discover(&paths.data_dir)?.connect(&args.target).await })?;
            output::print(&peer, args.read.json, output::peer)?;
        }
        Command::Offers(args) => {
            init_logging(cli.log_level.as_deref(), cli.log_level.is_some());
            let offers =
                runtime(false)?.block_on(async { Client::discover(&paths.data_dir)?.offers().await })?;
            output::print(&offers, args.json, output::offers)?;
        }
        Command::Ui(args) => {
            init_logging(cli.log_level.as_deref(), cli.log_level.is_some());
            let link =
                runtime(false)?.block_on(async { Client::discover(&paths.data_dir)?.login_link().await })?;
            output::print(&link, args.read.json, output::login_link)?;
            if !args.no_open && !args.read.json {
                open_in_browser(&link.url);
            }
        }
        Command::Pause(args) => {
            init_logging(cli.log_level.as_deref(), cli.log_level.is_some());
            // Refused here too, before the daemon is asked, so the line names the flag.
            if let Some(length) = args.length.filter(|length| *length > MAX_PAUSE) {
                anyhow::bail!(
                    "--for {} is longer than the longest pause ({}); leave --for out to pause until `hearth resume`",
                    humantime::format_duration(length),
                    humantime::format_duration(MAX_PAUSE)
                );
            }
            let pause = runtime(false)?
                .block_on(async { Client::discover(&paths.data_dir)?.pause(args.length).await })?;
            output::print(&pause, args.read.json, output::pause)?;
        }
        Command::Resume(args) => {
            init_logging(cli.log_level.as_deref(), cli.log_level.is_some());
            let status = runtime(false)?.block_on(async {
                let client = Client::discover(&paths.data_dir)?;
                client.resume().await?;
                client.status().await
            })?;
            output::print(&status, args.json, output::status)?;
        }
        Command::Policy(command) => {
            init_logging(cli.log_level.as_deref(), cli.log_level.is_some());
            policy(&paths, command)?;
        }
        Command::Blob(command) => {
            init_logging(cli.log_level.as_deref(), cli.log_level.is_some());
            return runtime(false)?.block_on(async {
                let client = Client::discover(&paths.data_dir)?;
                match command {
                    BlobCommand::Add { path, share, read } => {
                        transfers::add(&client, &path, &share, read.json).await?;
                    }
                    BlobCommand::Get { hash, folder, peer, out, max_size, detach, read } => {
                        let get = transfers::Get {
                            hash: &hash,
                            folder,
                            peer: &peer,
                            out: out.as_deref(),
                            max_bytes: max_size,
                            detach,
                            json: read.json,
                        };
                        return transfers::get(&client, get).await;
                    }
                    BlobCommand::Cancel { id } => transfers::cancel(&client, &id).await?,
                }
                Ok(ExitCode::SUCCESS)
            });
        }
        Command::Results { id, out, read } => {
            init_logging(cli.log_level.as_deref(), cli.log_level.is_some());
            let out = std::path::absolute(out.unwrap_or_else(|| PathBuf::from(format!("results-{id}"))))?;
            let imported = runtime(false)?.block_on(async {
                let client = Client::discover(&paths.data_dir)?;
                match remote::locate(&client, &id).await? {
                    remote::Where::Here => Ok::<_, anyhow::Error>(client.results(&id, &out).await?),
                    remote::Where::Remote => Ok(client.remote_results(&id, &out).await?),
                }
            })?;
            if read.json {
                output::print(&imported, true, output::imported)?;
            } else {
                output::out(&format!("{}\n", out.display()))?;
                eprintln!(
                    "hearth: {} files, {} (folder {})",
                    imported.files,
                    output::bytes(imported.size),
                    imported.blob.hash
                );
            }
        }
        Command::Transfers(args) => {
            init_logging(cli.log_level.as_deref(), cli.log_level.is_some());
            runtime(false)?
                .block_on(async { transfers::list(&Client::discover(&paths.data_dir)?, args.json).await })?;
        }
        Command::Ledger(command) => {
            init_logging(cli.log_level.as_deref(), cli.log_level.is_some());
            match command {
                LedgerCommand::Verify { db, export, strict, read } => {
                    let source = match (db, export) {
                        (Some(db), _) => ledger::Source::Db(db),
                        (None, Some(export)) => ledger::Source::Export { path: export, strict },
                        (None, None) => ledger::Source::Agent,
                    };
                    return runtime(false)?.block_on(ledger::verify(&paths, source, read.json));
                }
                LedgerCommand::Export { format, out, db, with_witnesses } => {
                    runtime(false)?.block_on(ledger::export(&paths, db, format, out, with_witnesses))?;
                }
                LedgerCommand::Witnesses { peer, read } => {
                    runtime(false)?.block_on(ledger::witnesses(&paths, peer, read.json))?;
                }
            }
        }
        Command::Earnings { by, read } => {
            init_logging(cli.log_level.as_deref(), cli.log_level.is_some());
            runtime(false)?.block_on(async {
                ledger::earnings(&Client::discover(&paths.data_dir)?, by, read.json).await
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `hearth policy`: through the running agent where there is one, so it applies the change at
/// once; on the file itself otherwise.
fn policy(paths: &Paths, command: PolicyCommand) -> anyhow::Result<()> {
    let client = Client::discover(&paths.data_dir).ok();
    match command {
        PolicyCommand::Show(args) => {
            let policy = match &client {
                Some(client) => match runtime(false)?.block_on(client.policy()) {
                    Ok(document) => document.policy,
                    Err(_) => Policy::load(&paths.policy_file())?,
                },
                None => Policy::load(&paths.policy_file())?,
            };
            output::print(&policy, args.json, output::policy)?;
        }
        PolicyCommand::Set { file } => {
            let text =
                hearth_api::local_file::read_text(&file, hearth_api::policy::MAX_POLICY_BYTES, "policy")?;
            // Checked here first, so the error names the file the owner wrote.
            Policy::parse(&text, &file.display().to_string())?;
            let applied = match &client {
                Some(client) => runtime(false)?.block_on(client.set_policy(&text)).is_ok(),
                None => false,
            };
            if !applied {
                Policy::store(&paths.policy_file(), &text)?;
            }
            output::out(&format!(
                "policy saved to {}{}\n",
                paths.policy_file().display(),
                if applied { " and applied" } else { "" }
            ))?;
        }
    }
    Ok(())
}

/// Logs to stderr, coloured only on a terminal. `--log-level` wins over `RUST_LOG`, which wins over
/// the configured level; commands other than the daemon default to warnings only.
fn init_logging(level: Option<&str>, explicit: bool) {
    let filter = match (explicit, std::env::var("RUST_LOG")) {
        (false, Ok(directives)) if !directives.is_empty() => EnvFilter::new(directives),
        _ => EnvFilter::new(level.unwrap_or("warn")),
    };
    let stderr = std::io::stderr();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(stderr.is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn runtime(multi_thread: bool) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder.enable_all().build().context("cannot start the async runtime")
}

/// Opens `url` in the desktop's browser with `xdg-open`, where a desktop session exists; says so
/// on stderr either way, since the link on stdout is what matters.
fn open_in_browser(url: &str) {
    let desktop =
        ["DISPLAY", "WAYLAND_DISPLAY"].iter().any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()));
    if !desktop {
        eprintln!("no desktop session here: open the link in a browser on this machine");
        return;
    }
    let started = std::process::Command::new("xdg-open")
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    match started {
        Ok(_) => eprintln!("opening it in your browser…"),
        Err(error) => eprintln!("could not start a browser ({error}): open the link yourself"),
    }
}
