//! Availability: whether this machine shares now, and how much. The owner's use always comes first.
//!
//! - [`policy`]: the owner's rules (`policy.toml`): windows, idle time, AC power, temperatures,
//!   reserves, exclusive programs, per-GPU rules and hysteresis.
//! - [`signals`]: what is measured, each source behind a small trait so tests can feed it: the
//!   clock, power supplies, hwmon temperatures, input devices, logind, CPU load, the process table.
//! - [`evaluate`]: the one evaluator, a pure function of policy, signals and time (plus the
//!   [`Memory`] it carries between calls) giving `Sharing { capacity }` or `Paused { reasons }`.
//!
//! The daemon samples the signals every second, evaluates, and publishes the result on a watch
//! channel and the event stream; the job supervisor freezes every running job when it turns
//! Paused and thaws them when sharing returns (see `daemon::availability`).

pub mod evaluate;
pub mod signals;

pub use evaluate::{Availability, Capacity, Memory, OwnerPause, Reason, Signals, evaluate};
pub use hearth_api::policy;
pub use policy::{Policy, PolicyError};

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The owner's levers, shared by the API and the availability task: the policy, the explicit
/// pause, and the desktop app's activity reports. Every change wakes the task at once.
#[derive(Debug)]
pub struct OwnerControls {
    policy_file: PathBuf,
    pause_file: PathBuf,
    policy: Mutex<Policy>,
    pause: Mutex<Option<OwnerPause>>,
    reports: Arc<Mutex<Option<Instant>>>,
    wake: Notify,
}

/// The file in the data dir that keeps an owner's pause across restarts.
pub const PAUSE_FILE: &str = "owner-pause.json";

/// The longest pause with an end: ten years. A longer one is refused; a pause with no length
/// lasts until `hearth resume`.
pub const MAX_PAUSE: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// The longest idle time the desktop app may report, the same ten years: an owner idle that
/// long is simply idle, and a larger figure is a broken client.
pub const MAX_IDLE: Duration = MAX_PAUSE;

/// Why an owner's lever was refused or not applied. A refused request changes nothing.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    /// A pause longer than [`MAX_PAUSE`].
    #[error(
        "a pause of {} is longer than the longest allowed ({}); pause with no length to pause until resumed",
        humantime::format_duration(*.0),
        humantime::format_duration(MAX_PAUSE)
    )]
    PauseTooLong(Duration),
    /// An idle time longer than [`MAX_IDLE`].
    #[error("an idle time of {} seconds is longer than the longest accepted ({})", .0.as_secs(), MAX_IDLE.as_secs())]
    IdleTooLong(Duration),
    /// The pause file could not be written or removed. Its message includes the OS's, so it is
    /// not also the error's source.
    #[error("cannot save the owner's pause: {0}")]
    Io(std::io::Error),
}

impl OwnerControls {
    /// Loads the policy file and any pause left by the previous run (a pause that has ended by
    /// now is dropped).
    pub fn load(policy_file: &Path, data_dir: &Path) -> Result<Self, PolicyError> {
        let policy = Policy::load(policy_file)?;
        let pause_file = data_dir.join(PAUSE_FILE);
        let pause = std::fs::read(&pause_file)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<OwnerPause>(&bytes).ok())
            .filter(|pause| pause.until.is_none_or(|until| until > jiff::Timestamp::now()));
        Ok(Self {
            policy_file: policy_file.to_owned(),
            pause_file,
            policy: Mutex::new(policy),
            pause: Mutex::new(pause),
            reports: Arc::default(),
            wake: Notify::new(),
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> Policy {
        self.policy.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Validates `text`, writes it as the policy file and applies it. An invalid policy changes
    /// nothing.
    pub fn set_policy(&self, text: &str) -> Result<Policy, PolicyError> {
        let policy = Policy::parse(text, "the new policy")?;
        Policy::store(&self.policy_file, text)?;
        *self.policy.lock().unwrap_or_else(PoisonError::into_inner) = policy.clone();
        self.wake.notify_one();
        Ok(policy)
    }

    /// The owner's pause in force, if any.
    pub fn pause_state(&self) -> Option<OwnerPause> {
        *self.pause.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Pauses sharing, for `length` (at most [`MAX_PAUSE`]) or until [`OwnerControls::resume`].
    /// Kept across restarts. A refused pause changes nothing.
    pub fn pause(&self, length: Option<Duration>) -> Result<OwnerPause, OwnerError> {
        let until = match length {
            Some(length) if length > MAX_PAUSE => return Err(OwnerError::PauseTooLong(length)),
            Some(length) => Some(
                jiff::Timestamp::now().checked_add(length).map_err(|_| OwnerError::PauseTooLong(length))?,
            ),
            None => None,
        };
        let pause = OwnerPause { until };
        let bytes =
            serde_json::to_vec(&pause).map_err(|error| OwnerError::Io(std::io::Error::other(error)))?;
        policy::replace_file(&self.pause_file, &bytes).map_err(OwnerError::Io)?;
        *self.pause.lock().unwrap_or_else(PoisonError::into_inner) = Some(pause);
        self.wake.notify_one();
        Ok(pause)
    }

    /// Ends the owner's pause.
    pub fn resume(&self) -> Result<(), OwnerError> {
        match std::fs::remove_file(&self.pause_file) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(OwnerError::Io(error)),
        }
        *self.pause.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.wake.notify_one();
        Ok(())
    }

    /// The desktop app says the owner last used the machine `idle` ago (at most [`MAX_IDLE`];
    /// a longer report is refused and changes nothing).
    pub fn report_idle(&self, idle: Duration) -> Result<(), OwnerError> {
        if idle > MAX_IDLE {
            return Err(OwnerError::IdleTooLong(idle));
        }
        // Before the monotonic clock's start (only on a platform whose clock starts at boot):
        // idle since then, which is as idle as this agent can tell.
        let now = Instant::now();
        let at = now.checked_sub(idle).unwrap_or_else(|| earliest(now, idle));
        *self.reports.lock().unwrap_or_else(PoisonError::into_inner) = Some(at);
        self.wake.notify_one();
        Ok(())
    }

    /// Where [`signals::Activity`] reads the desktop app's reports.
    pub fn reports(&self) -> Arc<Mutex<Option<Instant>>> {
        Arc::clone(&self.reports)
    }

    /// Resolves when the owner changed something.
    pub async fn changed(&self) {
        self.wake.notified().await;
    }
}

/// The earliest instant at most `idle` before `now` that the clock can represent: a report of
/// more idle time than the clock goes back still reads as idle, never as active.
fn earliest(now: Instant, idle: Duration) -> Instant {
    let (mut at, mut left, mut step) = (now, idle, idle);
    // Step back as far as the clock allows, halving the step each time it does not.
    while !step.is_zero() {
        match at.checked_sub(step).filter(|_| step <= left) {
            Some(earlier) => {
                at = earlier;
                left -= step;
            }
            None => step /= 2,
        }
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controls() -> (tempfile::TempDir, OwnerControls) {
        let dir = tempfile::tempdir().unwrap();
        let controls = OwnerControls::load(&dir.path().join("policy.toml"), dir.path()).unwrap();
        (dir, controls)
    }

    #[test]
    fn a_pause_too_long_is_refused_and_pauses_nothing() {
        let (dir, controls) = controls();
        for length in [MAX_PAUSE + Duration::from_secs(1), Duration::from_secs(u64::MAX)] {
            let error = controls.pause(Some(length)).unwrap_err();
            assert!(matches!(error, OwnerError::PauseTooLong(_)), "{error}");
            assert_eq!(controls.pause_state(), None);
            assert!(!dir.path().join(PAUSE_FILE).exists());
        }
        let longest = controls.pause(Some(MAX_PAUSE)).unwrap();
        assert!(longest.until.is_some());
        assert_eq!(controls.pause_state(), Some(longest));
    }

    #[test]
    fn an_idle_report_too_long_is_refused_and_records_nothing() {
        let (_dir, controls) = controls();
        let error = controls.report_idle(Duration::from_secs(u64::MAX)).unwrap_err();
        assert!(matches!(error, OwnerError::IdleTooLong(_)), "{error}");
        assert_eq!(*controls.reports().lock().unwrap(), None);
        controls.report_idle(MAX_IDLE).unwrap();
        let at = controls.reports().lock().unwrap().unwrap();
        // Read back as idle: long ago, not now.
        assert!(at.elapsed() > Duration::from_secs(60));
    }

    #[test]
    fn earliest_goes_back_as_far_as_the_clock_does() {
        let now = Instant::now();
        assert_eq!(earliest(now, Duration::from_secs(5)), now - Duration::from_secs(5));
        let far = earliest(now, Duration::from_secs(u64::MAX));
        assert!(far <= now);
    }
}
