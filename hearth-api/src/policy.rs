//! The owner's sharing policy: `policy.toml` in the config folder, parsed into a validated
//! [`Policy`]. Every field has a default, so an empty file (or none) means "share whenever the
//! machine is on, pause while the owner uses it".

use std::fs;
use std::io;
use std::path::Path;
use std::time::Duration;

use jiff::civil::{Time, Weekday};
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

use crate::local_file::{self, FileError};
use crate::toml_file;

/// The policy file's name in a data dir.
pub const POLICY_FILE: &str = "policy.toml";

/// The longest policy file read.
pub const MAX_POLICY_BYTES: u64 = 1 << 20;

/// What a new policy file says: the defaults, each explained.
pub const DEFAULT_FILE: &str = r#"# When this machine shares, and what it keeps for its owner.
# `hearth policy set FILE.toml` replaces this file; a running agent applies it at once.

# Time zone of the windows below; default: this machine's.
# timezone = "Europe/Berlin"

# When sharing is allowed. Without any window: at all times. A window whose `to` is not later than
# its `from` runs past midnight and belongs to the day it starts on.
# [[window]]
# days = ["mon", "tue", "wed", "thu", "fri"]
# from = "22:00"
# to = "07:00"

[owner]
# Share only after the owner has not touched keyboard, mouse or touchpad for this long ("0s": never wait).
idle = "5m"
# Use of all cores by anything but Hearth, in percent, that counts as the owner being busy (0: off).
busy_cpu = 50
# Share only while on mains power (a laptop shares while it charges).
only_on_ac = true
# Programs that pause sharing while they run (a game, an editor), matched by process name.
programs = []
# How long after the last of them exits sharing resumes.
program_cooldown = "2m"

[temperature]
# Pause above the first figure, resume below the second, in degrees Celsius.
cpu_pause = 90
cpu_resume = 80
gpu_pause = 85
gpu_resume = 75

[reserve]
# Percent of the cores, of the memory and of each GPU's memory kept for the owner.
cpu = 25
memory = 25
gpu = 0

[hysteresis]
# A condition pauses sharing only after it has lasted this long (the owner's own pause is at once).
grace = "2s"
# Sharing resumes only after a pause has lasted this long.
min_paused = "1m"
# Sharing lasts at least this long before a condition other than the owner's pause may end it.
min_sharing = "0s"
# A pause longer than this stops the paused jobs instead of keeping them frozen.
stop_after = "10m"

# Per GPU, by UUID or index: share it or not, or pause it alone.
# [[gpu]]
# uuid = "GPU-8a4c…"
# share = false
"#;

/// A validated policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// IANA name of the windows' time zone; `None` for this machine's.
    pub timezone: Option<String>,
    /// When sharing is allowed; empty for always.
    #[serde(rename = "window")]
    pub windows: Vec<Window>,
    /// The owner's own use of the machine.
    pub owner: Owner,
    /// Temperature limits.
    pub temperature: Temperature,
    /// What is kept for the owner.
    pub reserve: Reserve,
    /// Against flapping.
    pub hysteresis: Hysteresis,
    /// Per-GPU rules.
    #[serde(rename = "gpu")]
    pub gpus: Vec<GpuRule>,
}

/// A weekly window in which sharing is allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Days the window starts on: `mon` … `sun`, or `all`.
    pub days: Vec<String>,
    /// Start, `HH:MM` on the wall clock.
    pub from: String,
    /// End, `HH:MM`; not later than `from` means the next day.
    pub to: String,
}

/// The owner's use of the machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Owner {
    /// Idle time required before sharing, such as `"5m"`.
    #[serde(with = "humantime_serde")]
    #[schema(value_type = String)]
    pub idle: Duration,
    /// Foreign CPU use (percent of all cores) that counts as busy; 0 turns it off.
    pub busy_cpu: f32,
    /// Share only on mains power.
    pub only_on_ac: bool,
    /// Programs that pause sharing while they run.
    pub programs: Vec<String>,
    /// Time after the last of them exits before sharing resumes.
    #[serde(with = "humantime_serde")]
    #[schema(value_type = String)]
    pub program_cooldown: Duration,
}

impl Default for Owner {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(5 * 60),
            busy_cpu: 50.0,
            only_on_ac: true,
            programs: Vec::new(),
            program_cooldown: Duration::from_secs(2 * 60),
        }
    }
}

/// Temperature limits, in degrees Celsius: pause above, resume below.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Temperature {
    /// CPU: pause above.
    pub cpu_pause: f32,
    /// CPU: resume below.
    pub cpu_resume: f32,
    /// Each GPU: pause that GPU above.
    pub gpu_pause: f32,
    /// Each GPU: resume it below.
    pub gpu_resume: f32,
}

impl Default for Temperature {
    fn default() -> Self {
        Self { cpu_pause: 90.0, cpu_resume: 80.0, gpu_pause: 85.0, gpu_resume: 75.0 }
    }
}

/// Percent of each resource kept for the owner.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Reserve {
    /// Percent of the cores.
    pub cpu: f32,
    /// Percent of the memory.
    pub memory: f32,
    /// Percent of each GPU's memory.
    pub gpu: f32,
}

impl Default for Reserve {
    fn default() -> Self {
        Self { cpu: 25.0, memory: 25.0, gpu: 0.0 }
    }
}

/// Against flapping.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Hysteresis {
    /// How long a condition must last before it pauses sharing.
    #[serde(with = "humantime_serde")]
    #[schema(value_type = String)]
    pub grace: Duration,
    /// The shortest pause.
    #[serde(with = "humantime_serde")]
    #[schema(value_type = String)]
    pub min_paused: Duration,
    /// The shortest sharing spell a measured condition may end.
    #[serde(with = "humantime_serde")]
    #[schema(value_type = String)]
    pub min_sharing: Duration,
    /// A pause longer than this stops the paused jobs.
    #[serde(with = "humantime_serde")]
    #[schema(value_type = String)]
    pub stop_after: Duration,
}

impl Default for Hysteresis {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(2),
            min_paused: Duration::from_secs(60),
            min_sharing: Duration::ZERO,
            stop_after: Duration::from_secs(10 * 60),
        }
    }
}

/// One GPU's rule, naming it by UUID or by index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GpuRule {
    /// NVML UUID, such as `GPU-8a4c…`.
    pub uuid: Option<String>,
    /// NVML index.
    pub index: Option<u32>,
    /// Offer this GPU at all (default true).
    #[serde(default = "yes")]
    pub share: bool,
    /// Pause this GPU alone (default false).
    #[serde(default)]
    pub pause: bool,
}

fn yes() -> bool {
    true
}

/// A policy that cannot be used, with the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The policy file.
        path: String,
        /// What went wrong.
        source: io::Error,
    },
    /// The file could not be read: not a regular file, or too large.
    #[error(transparent)]
    Read(#[from] FileError),
    /// The text is not a valid policy.
    #[error("{origin}: {message}")]
    Invalid {
        /// Where the text came from (a file's path).
        origin: String,
        /// The field and what was expected, on one line.
        message: String,
    },
}

impl Policy {
    /// Parses and validates a policy; `origin` names the text in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, PolicyError> {
        let invalid = |message: String| PolicyError::Invalid { origin: origin.to_owned(), message };
        let policy: Self = toml_file::parse(text).map_err(invalid)?;
        policy.validate().map_err(invalid)?;
        Ok(policy)
    }

    /// Reads the policy file; a missing file is the default policy.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        match local_file::read_text(path, MAX_POLICY_BYTES, "policy") {
            Ok(text) => Self::parse(&text, &path.display().to_string()),
            Err(error) if error.is_not_found() => Ok(Self::default()),
            Err(error) => Err(PolicyError::Read(error)),
        }
    }

    /// Writes `text` (already validated by [`Policy::parse`]) as the policy file, atomically: a
    /// crash leaves the old file or the new one, never a mix.
    pub fn store(path: &Path, text: &str) -> Result<(), PolicyError> {
        replace_file(path, text.as_bytes())
            .map_err(|source| PolicyError::Io { path: path.display().to_string(), source })
    }

    /// The windows' time zone.
    pub fn time_zone(&self) -> TimeZone {
        match &self.timezone {
            // Validated to exist.
            Some(name) => TimeZone::get(name).unwrap_or(TimeZone::UTC),
            None => TimeZone::try_system().unwrap_or(TimeZone::UTC),
        }
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(name) = &self.timezone
            && TimeZone::get(name).is_err()
        {
            return Err(format!("`timezone`: {name:?} is not a known time zone (such as \"Europe/Berlin\")"));
        }
        for (i, window) in self.windows.iter().enumerate() {
            window.parsed().map_err(|message| format!("`window[{i}].{message}"))?;
        }
        let percent = |field: &str, value: f32| {
            if (0.0..=100.0).contains(&value) {
                Ok(())
            } else {
                Err(format!("`{field}`: is {value}; expected a percentage from 0 to 100"))
            }
        };
        percent("owner.busy_cpu", self.owner.busy_cpu)?;
        percent("reserve.cpu", self.reserve.cpu)?;
        percent("reserve.memory", self.reserve.memory)?;
        percent("reserve.gpu", self.reserve.gpu)?;
        let t = &self.temperature;
        for (pause, resume, name) in [(t.cpu_pause, t.cpu_resume, "cpu"), (t.gpu_pause, t.gpu_resume, "gpu")]
        {
            if resume >= pause {
                return Err(format!(
                    "`temperature.{name}_resume`: is {resume}; expected less than {name}_pause ({pause})"
                ));
            }
        }
        for (i, rule) in self.gpus.iter().enumerate() {
            if rule.uuid.is_some() == rule.index.is_some() {
                return Err(format!("`gpu[{i}]`: expected exactly one of `uuid` and `index`"));
            }
        }
        if self.owner.programs.iter().any(|name| name.trim().is_empty()) {
            return Err("`owner.programs`: a program name is empty".into());
        }
        Ok(())
    }
}

/// Replaces `path` with `bytes` through a synced temporary file renamed into place (creating the
/// folder if needed), so a crash leaves the old file or the new one, never a mix.
pub fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let mut temporary = tempfile::NamedTempFile::new_in(dir)?;
    io::Write::write_all(&mut temporary, bytes)?;
    temporary.as_file().sync_all()?;
    temporary.persist(path).map_err(|error| error.error)?;
    Ok(())
}

/// A window with its days and times parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedWindow {
    /// Bit `n` set: the window starts on the weekday `n` days after Monday.
    pub days: u8,
    /// When it starts, local time.
    pub from: Time,
    /// When it ends, local time.
    pub to: Time,
}

impl Window {
    /// The window's days and times; the error starts with the field's name.
    pub fn parsed(&self) -> Result<ParsedWindow, String> {
        let mut days = 0u8;
        for day in &self.days {
            days |= match day.to_ascii_lowercase().as_str() {
                "all" => 0x7f,
                name => {
                    let index = DAYS.iter().position(|full| name == *full || name == &full[..3]).ok_or_else(
                        || format!("days`: {day:?} is not a day; expected mon, tue, … sun or all"),
                    )?;
                    1 << index
                }
            };
        }
        if days == 0 {
            return Err("days`: is empty; expected at least one day".into());
        }
        let time = |field: &str, text: &str| {
            text.parse::<Time>()
                .map_err(|_| format!("{field}`: {text:?} is not a time; expected HH:MM such as \"22:00\""))
        };
        Ok(ParsedWindow { days, from: time("from", &self.from)?, to: time("to", &self.to)? })
    }
}

/// Day names, Monday first; the first three letters are accepted too.
const DAYS: [&str; 7] = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"];

/// Monday = 0 … Sunday = 6.
pub fn day_bit(day: Weekday) -> u8 {
    1 << (day.to_monday_zero_offset() as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_file_is_the_default_policy() {
        assert_eq!(Policy::parse(DEFAULT_FILE, "default").unwrap(), Policy::default());
        assert_eq!(Policy::parse("", "empty").unwrap(), Policy::default());
    }

    #[test]
    fn errors_name_the_field() {
        for (text, field) in [
            ("timezone = \"Mars/Olympus\"\n", "`timezone`"),
            ("[[window]]\ndays = [\"funday\"]\nfrom = \"22:00\"\nto = \"07:00\"\n", "`window[0].days`"),
            ("[[window]]\ndays = [\"mon\"]\nfrom = \"25:00\"\nto = \"07:00\"\n", "`window[0].from`"),
            ("[[window]]\ndays = []\nfrom = \"22:00\"\nto = \"07:00\"\n", "`window[0].days`"),
            ("[reserve]\ncpu = 120\n", "`reserve.cpu`"),
            ("[temperature]\ncpu_pause = 70\ncpu_resume = 80\n", "`temperature.cpu_resume`"),
            ("[[gpu]]\nshare = false\n", "`gpu[0]`"),
            ("[owner]\nidle = \"soon\"\n", "owner.idle"),
            ("[owner]\nidel = \"5m\"\n", "idel"),
        ] {
            let error = Policy::parse(text, "policy.toml").unwrap_err().to_string();
            assert!(error.contains(field), "{text:?} gave {error:?}");
            assert!(error.starts_with("policy.toml: ") && !error.contains('\n'), "{error:?}");
        }
    }

    #[test]
    fn days_and_times_parse() {
        let window =
            Window { days: vec!["Mon".into(), "friday".into()], from: "22:00".into(), to: "07:30".into() };
        let parsed = window.parsed().unwrap();
        assert_eq!(parsed.days, day_bit(Weekday::Monday) | day_bit(Weekday::Friday));
        assert_eq!(parsed.to, Time::constant(7, 30, 0, 0));
        let all = Window { days: vec!["all".into()], from: "00:00".into(), to: "00:00".into() };
        assert_eq!(all.parsed().unwrap().days, 0x7f);
    }

    #[test]
    fn storing_replaces_the_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(POLICY_FILE);
        assert_eq!(Policy::load(&path).unwrap(), Policy::default());
        Policy::store(&path, "[reserve]\ncpu = 50\n").unwrap();
        assert_eq!(Policy::load(&path).unwrap().reserve.cpu, 50.0);
    }
}
