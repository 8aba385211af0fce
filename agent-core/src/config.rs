//! Where an agent keeps its files, and its configuration.
//!
//! [`Paths`] places one agent: by default in the platform's directories (`directories::ProjectDirs`),
//! or wholly under `--data-dir DIR` / `HEARTH_DATA_DIR`, so several agents can share a machine.
//! [`HearthConfig`] merges, in rising precedence, built-in defaults, the TOML file, the environment
//! and command-line flags, then validates the result; every error names the offending field.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use hearth_api::local_file::{self, FileError};
use hearth_api::toml_file;

/// File name of the configuration inside the config dir.
pub const CONFIG_FILE: &str = "config.toml";

/// The longest config file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The default port of the control API. Fixed, so that a bookmark to the web UI keeps working.
pub const DEFAULT_API_PORT: u16 = 7447;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No home directory to derive default paths from, and no `--data-dir`.
    #[error("cannot find a home directory for Hearth's files; pass --data-dir DIR or set HEARTH_DATA_DIR")]
    NoHome,
    /// The file exists but could not be read: not a regular file, too large, unreadable.
    #[error(transparent)]
    Read(#[from] FileError),
    /// The file is not valid TOML for this schema. `toml` names the field and line.
    #[error("config {path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The parser's message, on one line.
        message: String,
    },
    /// A value has the right type but is not allowed.
    #[error("config {source_name}: `{field}` {reason}")]
    Invalid {
        /// Where the value came from: the file's path, an environment variable or a flag.
        source_name: String,
        /// The dotted field name, such as `api.port`.
        field: &'static str,
        /// What was expected.
        reason: String,
    },
}

pub use hearth_api::policy::POLICY_FILE;

/// Where one agent's files live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// Identity, store, lock, API discovery files.
    pub data_dir: PathBuf,
    /// The configuration file.
    pub config_file: PathBuf,
}

impl Paths {
    /// Everything under `data_dir` when given; otherwise the platform's defaults. An explicit
    /// `config_file` wins over both.
    pub fn resolve(data_dir: Option<PathBuf>, config_file: Option<PathBuf>) -> Result<Self, ConfigError> {
        let (data_dir, default_config) = match data_dir {
            Some(dir) => {
                let config = dir.join(CONFIG_FILE);
                (dir, config)
            }
            None => {
                let dirs =
                    directories::ProjectDirs::from("org", "Hearth", "hearth").ok_or(ConfigError::NoHome)?;
                (dirs.data_dir().to_owned(), dirs.config_dir().join(CONFIG_FILE))
            }
        };
        Ok(Self { data_dir, config_file: config_file.unwrap_or(default_config) })
    }

    /// The SQLite store.
    pub fn store(&self) -> PathBuf {
        self.data_dir.join("hearth.db")
    }

    /// The lock that keeps one daemon per data dir.
    pub fn lock(&self) -> PathBuf {
        self.data_dir.join("daemon.lock")
    }

    /// Where the daemon announces its API address.
    pub fn api_info(&self) -> PathBuf {
        self.data_dir.join(hearth_api::discovery::API_INFO_FILE)
    }

    /// The owner's sharing policy, beside the configuration file.
    pub fn policy_file(&self) -> PathBuf {
        let dir = self.config_file.parent().unwrap_or(&self.data_dir);
        dir.join(POLICY_FILE)
    }

    /// The API's bearer token (mode 0600).
    pub fn api_token(&self) -> PathBuf {
        self.data_dir.join(hearth_api::discovery::API_TOKEN_FILE)
    }

    /// The blob store's folder.
    pub fn blobs(&self) -> PathBuf {
        self.data_dir.join("blobs")
    }

    /// The market's folder: the files of the jobs this agent runs for others.
    pub fn market(&self) -> PathBuf {
        self.data_dir.join("market")
    }
}

/// The whole configuration of an agent.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HearthConfig {
    /// The local control API.
    pub api: ApiConfig,
    /// Resource detection.
    pub resources: ResourcesConfig,
    /// Logging.
    pub log: LogConfig,
    /// The peer-to-peer network.
    pub network: NetworkConfig,
    /// The ledger of records and receipts.
    pub ledger: LedgerConfig,
    /// TEST SETTINGS, for test suites and benchmarks only; see [`TestingConfig`].
    pub testing: TestingConfig,
}

/// How the UUIDs of `[testing] fake_gpus` begin.
pub const FAKE_GPU_PREFIX: &str = "FAKE-GPU-";

/// `[testing]`: settings that make an agent claim what it does not have, so that tests can
/// exercise code paths this machine lacks. Never set on an agent that shares for real; the daemon
/// logs a warning at start when any is set.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TestingConfig {
    /// TEST SETTING: GPUs the agent declares beside its real ones (`FAKE-GPU-0`, …), so that
    /// request packages asking for GPUs can be acquired on machines without any. They appear in
    /// the capacity, the advert and reservations; nothing can run on them, and a job spec that
    /// asks for GPUs is still refused.
    pub fake_gpus: u32,
    /// Memory of each fake GPU, such as `"24GiB"`.
    pub fake_gpu_memory: Option<String>,
}

impl TestingConfig {
    /// The fake GPUs as (UUID, memory in bytes); 24 GiB each unless told.
    pub fn fake_gpus(&self) -> Vec<(String, u64)> {
        let memory = self
            .fake_gpu_memory
            .as_deref()
            .and_then(|text| text.trim().parse::<bytesize::ByteSize>().ok())
            .map_or(24 << 30, |size| size.as_u64());
        (0..self.fake_gpus).map(|i| (format!("{FAKE_GPU_PREFIX}{i}"), memory)).collect()
    }
}

/// When the ledger appends its records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerMode {
    /// Each record in its own transaction, as it happens.
    #[default]
    Realtime,
    /// A job's records together, in one transaction, when it completes.
    Batch,
}

/// The `[ledger]` section of the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LedgerConfig {
    /// `realtime` or `batch`.
    pub mode: LedgerMode,
}

/// The peer-to-peer network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Multiaddrs to listen on.
    pub listen: Vec<String>,
    /// Agents to meet first, as multiaddrs ending in `/p2p/PEER_ID`.
    pub bootstrap: Vec<String>,
    /// Find agents on the LAN by mDNS.
    pub mdns: bool,
    /// Also serve as a relay and bootstrap node for agents behind NAT.
    pub relay: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            listen: vec!["/ip4/0.0.0.0/tcp/0".into(), "/ip4/0.0.0.0/udp/0/quic-v1".into()],
            bootstrap: Vec::new(),
            mdns: true,
            relay: false,
        }
    }
}

/// The local control API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// TCP port on 127.0.0.1; 0 picks any free port.
    pub port: u16,
    /// The most bytes one upload (a job spec's or a package's files, a blob) may hold in all.
    pub upload_max_bytes: u64,
    /// The most bytes one uploaded file may hold.
    pub upload_max_file_bytes: u64,
    /// The most files and folders one upload may hold.
    pub upload_max_files: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            port: DEFAULT_API_PORT,
            upload_max_bytes: 16 << 30,
            upload_max_file_bytes: 16 << 30,
            upload_max_files: 10_000,
        }
    }
}

/// Resource detection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResourcesConfig {
    /// How often the daemon re-reads CPU, memory, disk and GPU figures.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
}

impl Default for ResourcesConfig {
    fn default() -> Self {
        Self { refresh_interval: Duration::from_secs(10) }
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug` or `trace`. `RUST_LOG` and `--log-level` override it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".to_owned() }
    }
}

/// Values given on the command line or in the environment, which win over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--api-port` / `HEARTH_API_PORT`.
    pub api_port: Option<u16>,
    /// `--log-level`.
    pub log_level: Option<String>,
    /// `--listen`, repeatable; replaces `network.listen`.
    pub listen: Vec<String>,
    /// `--bootstrap`, repeatable; added to `network.bootstrap`.
    pub bootstrap: Vec<String>,
    /// `--relay`.
    pub relay: bool,
    /// `--no-mdns`: meet no agent by mDNS, whatever `network.mdns` says.
    pub no_mdns: bool,
}

/// The levels `log.level` accepts.
pub const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// The file written on first start, so an owner finds every setting with its default.
pub const DEFAULT_FILE: &str = r#"# Hearth agent configuration. Every setting is shown with its default.
# Environment variables and command-line flags override what is written here.

[api]
# Port of the control API and web UI on 127.0.0.1 (0 picks any free port).
# Overridden by --api-port or HEARTH_API_PORT.
port = 7447
# What one upload (a job spec or package with its files, or a blob) may hold: files and folders,
# bytes of one file, bytes in all. Past a limit the API answers 413 upload_too_large.
upload_max_files = 10000
upload_max_file_bytes = 17179869184
upload_max_bytes = 17179869184

[resources]
# How often CPU, memory, disk and GPU figures are refreshed.
refresh_interval = "10s"

[log]
# error, warn, info, debug or trace. RUST_LOG and --log-level override it.
level = "info"

[network]
# Where to accept peers (TCP and QUIC on every interface, any free port). --listen replaces it.
listen = ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"]
# Agents to meet first, each as a multiaddr ending in /p2p/PEER_ID (`hearth status` prints this
# agent's). --bootstrap adds to the list.
bootstrap = []
# Find other agents on this LAN with no configuration.
mdns = true
# Also relay for agents behind NAT, as a bootstrap node does (--relay).
relay = false

[ledger]
# When records of dealings with other agents are written: "realtime" (each as it happens, in its
# own transaction) or "batch" (a job's records together, with its receipt, when it completes).
mode = "realtime"
"#;

impl HearthConfig {
    /// Reads the file (defaults when it does not exist), applies `overrides` and validates the
    /// result, so a flag can correct a bad value in the file.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut config = match local_file::read_text(path, MAX_CONFIG_BYTES, "config") {
            Ok(text) => Self::parse(&text, path)?,
            Err(error) if error.is_not_found() => Self::default(),
            Err(error) => return Err(error.into()),
        };
        if let Some(port) = overrides.api_port {
            config.api.port = port;
        }
        if let Some(level) = &overrides.log_level {
            config.log.level = level.clone();
        }
        if !overrides.listen.is_empty() {
            config.network.listen = overrides.listen.clone();
        }
        config.network.bootstrap.extend(overrides.bootstrap.iter().cloned());
        config.network.relay |= overrides.relay;
        config.network.mdns &= !overrides.no_mdns;
        let file = path.display().to_string();
        config.validate(|field| match field {
            "log.level" if overrides.log_level.is_some() => "--log-level".to_owned(),
            "network.listen" if !overrides.listen.is_empty() => "--listen".to_owned(),
            "network.bootstrap" if !overrides.bootstrap.is_empty() => "--bootstrap or the file".to_owned(),
            _ => file.clone(),
        })
    }

    /// Parses TOML text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml_file::parse(text).map_err(|message| ConfigError::Parse { path: path.to_owned(), message })
    }

    /// Writes [`DEFAULT_FILE`] to `path` unless a file is already there.
    pub fn write_default_if_missing(path: &Path) -> io::Result<bool> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        match fs::OpenOptions::new().write(true).create_new(true).open(path) {
            Ok(mut file) => {
                io::Write::write_all(&mut file, DEFAULT_FILE.as_bytes())?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Checks the values types cannot; `source_of` names where a field's value came from.
    fn validate(self, source_of: impl Fn(&str) -> String) -> Result<Self, ConfigError> {
        let invalid = |field: &'static str, reason: String| ConfigError::Invalid {
            source_name: source_of(field),
            field,
            reason,
        };
        if !LOG_LEVELS.contains(&self.log.level.as_str()) {
            return Err(invalid(
                "log.level",
                format!("is {:?}; expected one of {}", self.log.level, LOG_LEVELS.join(", ")),
            ));
        }
        for (field, addresses) in
            [("network.listen", &self.network.listen), ("network.bootstrap", &self.network.bootstrap)]
        {
            for address in addresses {
                if let Err(error) = address.parse::<libp2p::Multiaddr>() {
                    return Err(invalid(
                        field,
                        format!("has {address:?}, which is not a multiaddr: {error}"),
                    ));
                }
            }
        }
        if let Some(address) = self.network.bootstrap.iter().find(|a| !a.contains("/p2p/")) {
            return Err(invalid(
                "network.bootstrap",
                format!("has {address:?}; expected it to end in /p2p/PEER_ID"),
            ));
        }
        for (field, zero) in [
            ("api.upload_max_files", self.api.upload_max_files == 0),
            ("api.upload_max_file_bytes", self.api.upload_max_file_bytes == 0),
            ("api.upload_max_bytes", self.api.upload_max_bytes == 0),
        ] {
            if zero {
                return Err(invalid(field, "is 0; expected at least 1, or every upload is refused".into()));
            }
        }
        let interval = self.resources.refresh_interval;
        if interval < Duration::from_secs(1) || interval > Duration::from_secs(3600) {
            return Err(invalid(
                "resources.refresh_interval",
                format!("is {}; expected between 1s and 1h", humantime::format_duration(interval)),
            ));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str, overrides: &Overrides) -> Result<HearthConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        fs::write(&path, text).unwrap();
        HearthConfig::load(&path, overrides)
    }

    #[test]
    fn the_default_file_says_exactly_the_defaults() {
        let parsed = HearthConfig::parse(DEFAULT_FILE, Path::new("x")).unwrap();
        assert_eq!(parsed, HearthConfig::default());
    }

    #[test]
    fn a_missing_file_means_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let config = HearthConfig::load(&dir.path().join("none.toml"), &Overrides::default()).unwrap();
        assert_eq!(config, HearthConfig::default());
    }

    #[test]
    fn flags_and_environment_win_over_the_file() {
        let overrides = Overrides {
            api_port: Some(0),
            log_level: Some("debug".into()),
            no_mdns: true,
            ..Overrides::default()
        };
        let config =
            load_text("[api]\nport = 9000\n[log]\nlevel = \"warn\"\n[network]\nmdns = true\n", &overrides)
                .unwrap();
        assert_eq!(config.api.port, 0);
        assert_eq!(config.log.level, "debug");
        assert!(!config.network.mdns, "--no-mdns wins over the file");
        let config = load_text("[network]\nmdns = false\n", &Overrides::default()).unwrap();
        assert!(!config.network.mdns, "no flag leaves the file's choice");
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            ("[api]\nprot = 1\n", "prot"),
            ("[api]\nport = 70000\n", "port"),
            ("[api]\nport = \"x\"\n", "port"),
            ("[resources]\nrefresh_interval = \"soon\"\n", "refresh_interval"),
            ("[resources]\nrefresh_interval = \"10ms\"\n", "resources.refresh_interval"),
            ("[log]\nlevel = \"loud\"\n", "log.level"),
            ("[api]\nupload_max_files = 0\n", "api.upload_max_files"),
            ("[api]\nupload_max_bytes = -1\n", "upload_max_bytes"),
            ("[nope]\n", "nope"),
        ];
        for (text, field) in cases {
            let err = load_text(text, &Overrides::default()).unwrap_err().to_string();
            assert!(err.contains(field), "{text:?} gave {err:?}, which does not name {field}");
            assert!(!err.contains('\n'), "errors are one line: {err:?}");
        }
    }

    #[test]
    fn a_flag_corrects_a_bad_value_in_the_file() {
        let overrides = Overrides { log_level: Some("warn".into()), ..Overrides::default() };
        let config = load_text("[log]\nlevel = \"loud\"\n", &overrides).unwrap();
        assert_eq!(config.log.level, "warn");
    }

    #[test]
    fn a_bad_flag_is_named_as_the_flag() {
        let overrides = Overrides { log_level: Some("chatty".into()), ..Overrides::default() };
        let err = load_text("", &overrides).unwrap_err().to_string();
        assert!(err.contains("--log-level") && err.contains("log.level"), "{err}");
    }

    #[test]
    fn data_dir_puts_everything_of_one_agent_under_it() {
        let paths = Paths::resolve(Some("/srv/agent-a".into()), None).unwrap();
        for path in
            [paths.config_file.clone(), paths.store(), paths.lock(), paths.api_info(), paths.api_token()]
        {
            assert!(path.starts_with("/srv/agent-a"), "{}", path.display());
        }
    }

    #[test]
    fn the_default_file_is_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(CONFIG_FILE);
        assert!(HearthConfig::write_default_if_missing(&path).unwrap());
        fs::write(&path, "[api]\nport = 1234\n").unwrap();
        assert!(!HearthConfig::write_default_if_missing(&path).unwrap());
        assert_eq!(fs::read_to_string(&path).unwrap(), "[api]\nport = 1234\n");
    }
}
