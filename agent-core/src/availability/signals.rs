//! The signals, read for real. Each source implements [`Source`] and fills in its part of a
//! [`Signals`] snapshot, so the daemon samples them all the same way and tests can feed their own.
//! Parsers take the root of the tree they read (`/sys/class/power_supply`, `/sys/class/hwmon`,
//! `/proc`), so fixture trees stand in for a real machine.

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Policy, Signals};

/// One source of signals.
pub trait Source: Send {
    /// Reads the source and writes what it knows into `signals`; `policy` says what is wanted
    /// (the process table is read only when it names programs).
    fn sample(&mut self, policy: &Policy, signals: &mut Signals);
}

/// Mains power from `/sys/class/power_supply`.
pub struct PowerSupply {
    root: PathBuf,
}

impl PowerSupply {
    /// Reads the supplies under `root` (normally `/sys/class/power_supply`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
}

impl Source for PowerSupply {
    fn sample(&mut self, _policy: &Policy, signals: &mut Signals) {
        signals.on_ac = on_ac(&self.root);
    }
}

/// `Some(true)` on mains power, `Some(false)` on battery, `None` for a machine without a battery
/// (a desktop), which is on mains by definition and needs no rule.
pub fn on_ac(root: &Path) -> Option<bool> {
    let read = |dir: &Path, name: &str| fs::read_to_string(dir.join(name)).map(|s| s.trim().to_owned()).ok();
    let mut has_battery = false;
    let mut mains = None;
    for entry in fs::read_dir(root).ok()?.flatten() {
        let dir = entry.path();
        match read(&dir, "type").as_deref() {
            // A peripheral's battery (a mouse, a headset) says nothing about the machine.
            Some("Battery") if read(&dir, "scope").as_deref() != Some("Device") => {
                has_battery = true;
                if read(&dir, "status").as_deref() == Some("Discharging") {
                    mains.get_or_insert(false);
                }
            }
            Some("Mains" | "USB") => {
                if read(&dir, "online").as_deref() == Some("1") {
                    mains = Some(true);
                } else {
                    mains.get_or_insert(false);
                }
            }
            _ => {}
        }
    }
    if has_battery { Some(mains.unwrap_or(true)) } else { None }
}

/// The hottest CPU sensor from `/sys/class/hwmon`.
pub struct Hwmon {
    root: PathBuf,
}

impl Hwmon {
    /// Reads the sensors under `root` (normally `/sys/class/hwmon`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
}

impl Source for Hwmon {
    fn sample(&mut self, _policy: &Policy, signals: &mut Signals) {
        signals.cpu_celsius = cpu_celsius(&self.root);
    }
}

/// hwmon drivers that measure the CPU package or its cores.
const CPU_SENSORS: &[&str] = &["coretemp", "k10temp", "zenpower", "k8temp", "cpu_thermal", "via_cputemp"];

/// The highest `temp*_input` of the CPU's hwmon chips, in degrees Celsius.
pub fn cpu_celsius(root: &Path) -> Option<f32> {
    let mut hottest: Option<f32> = None;
    for entry in fs::read_dir(root).ok()?.flatten() {
        let dir = entry.path();
        let name = fs::read_to_string(dir.join("name")).unwrap_or_default();
        if !CPU_SENSORS.contains(&name.trim()) {
            continue;
        }
        for file in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let file_name = file.file_name();
            let file_name = file_name.to_string_lossy();
            if file_name.starts_with("temp") && file_name.ends_with("_input") {
                let millis = fs::read_to_string(file.path()).ok().and_then(|s| s.trim().parse::<i64>().ok());
                if let Some(millis) = millis {
                    let celsius = millis as f32 / 1000.0;
                    hottest = Some(hottest.map_or(celsius, |h| h.max(celsius)));
                }
            }
        }
    }
    hottest
}

/// CPU use by anything but Hearth: `/proc/stat` less the agent's and its jobs' own CPU time.
pub struct CpuLoad {
    proc_root: PathBuf,
    hearth: Box<dyn Fn() -> Option<Duration> + Send>,
    last: Option<(CpuTimes, Duration)>,
}

impl CpuLoad {
    /// Reads `proc_root/stat`; `hearth` returns the CPU time Hearth (agent and jobs) has used.
    pub fn new(proc_root: impl Into<PathBuf>, hearth: Box<dyn Fn() -> Option<Duration> + Send>) -> Self {
        Self { proc_root: proc_root.into(), hearth, last: None }
    }
}

impl Source for CpuLoad {
    fn sample(&mut self, _policy: &Policy, signals: &mut Signals) {
        let (Some(now), Some(ours)) = (cpu_times(&self.proc_root), (self.hearth)()) else {
            signals.foreign_cpu = None;
            return;
        };
        signals.foreign_cpu = self.last.and_then(|(before, ours_before)| {
            let total = now.total.checked_sub(before.total)?;
            let busy = now.busy.checked_sub(before.busy)?;
            let ours = ours.saturating_sub(ours_before);
            (!total.is_zero()).then(|| {
                let foreign = busy.saturating_sub(ours);
                (foreign.as_secs_f64() / total.as_secs_f64() * 100.0).clamp(0.0, 100.0) as f32
            })
        });
        self.last = Some((now, ours));
    }
}

/// Time all CPUs spent, and spent busy, since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// All time, idle included.
    pub total: Duration,
    /// Time not idle and not waiting for I/O.
    pub busy: Duration,
}

/// The first line of `/proc/stat`, in clock ticks of 1/100 s (USER_HZ on every Linux architecture
/// Hearth runs on).
pub fn cpu_times(proc_root: &Path) -> Option<CpuTimes> {
    let stat = fs::read_to_string(proc_root.join("stat")).ok()?;
    let fields: Vec<u64> =
        stat.lines().next()?.split_whitespace().skip(1).map_while(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user and nice).
    let sum = |range: std::ops::Range<usize>| fields.get(range).map(|f| f.iter().sum::<u64>());
    let total = sum(0..8).or_else(|| sum(0..fields.len()))?;
    let idle = fields.get(3)? + fields.get(4).unwrap_or(&0);
    let ticks = |n: u64| Duration::from_millis(n * 10);
    Some(CpuTimes { total: ticks(total), busy: ticks(total.saturating_sub(idle)) })
}

/// CPU time of this process (all its threads), from `/proc/self/stat`.
pub fn own_cpu_time() -> Option<Duration> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces; fields are counted after its closing parenthesis.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Names of running processes, read from `/proc`, only when the policy names programs.
pub struct ProcessTable {
    proc_root: PathBuf,
    every: Duration,
    last: Option<(Instant, Vec<String>)>,
}

impl ProcessTable {
    /// Reads `proc_root` (normally `/proc`) at most once per `every`.
    pub fn new(proc_root: impl Into<PathBuf>, every: Duration) -> Self {
        Self { proc_root: proc_root.into(), every, last: None }
    }
}

impl Source for ProcessTable {
    fn sample(&mut self, policy: &Policy, signals: &mut Signals) {
        if policy.owner.programs.is_empty() {
            signals.programs.clear();
            return;
        }
        let fresh = self.last.as_ref().is_some_and(|(at, _)| at.elapsed() < self.every);
        if !fresh {
            self.last = Some((Instant::now(), process_names(&self.proc_root)));
        }
        signals.programs = self.last.as_ref().map(|(_, names)| names.clone()).unwrap_or_default();
    }
}

/// Each process's name, lower-case: its `comm`, and the file name of its first argument (which
/// is not cut to 15 bytes and names scripts run by an interpreter less often).
pub fn process_names(proc_root: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in fs::read_dir(proc_root).into_iter().flatten().flatten() {
        if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(comm) = fs::read_to_string(entry.path().join("comm")) {
            names.push(comm.trim().to_lowercase());
        }
        if let Ok(cmdline) = fs::read(entry.path().join("cmdline")) {
            let first = cmdline.split(|&b| b == 0).next().unwrap_or_default();
            let first = String::from_utf8_lossy(first);
            if let Some(name) = Path::new(first.as_ref()).file_name() {
                names.push(name.to_string_lossy().to_lowercase());
            }
        }
    }
    names.sort_unstable();
    names.dedup();
    names
}

/// The owner's activity: input devices, logind's idle hint, and reports from the desktop app,
/// the most recent of them winning.
pub struct Activity {
    input: Option<InputWatcher>,
    logind: Logind,
    reports: Arc<Mutex<Option<Instant>>>,
}

impl Activity {
    /// Starts watching `dev_input` (normally `/dev/input`, classified through `sys_input`,
    /// normally `/sys/class/input`) where its devices can be opened; `reports` is where the API
    /// records the desktop app's reports (the moment of the owner's last input).
    pub fn new(
        dev_input: impl Into<PathBuf>,
        sys_input: impl Into<PathBuf>,
        reports: Arc<Mutex<Option<Instant>>>,
    ) -> Self {
        Self {
            input: InputWatcher::start(dev_input.into(), sys_input.into()),
            logind: Logind::default(),
            reports,
        }
    }
}

impl Source for Activity {
    fn sample(&mut self, _policy: &Policy, signals: &mut Signals) {
        let reported = self.reports.lock().ok().and_then(|last| *last).map(|at| at.elapsed());
        let input = self.input.as_ref().and_then(InputWatcher::idle);
        let session = self.logind.idle();
        signals.idle = [reported, input, session].into_iter().flatten().min();
    }
}

impl Drop for Activity {
    fn drop(&mut self) {
        if let Some(input) = &self.input {
            input.stop.store(true, Ordering::Relaxed);
        }
    }
}

/// A thread that reads every keyboard, mouse and touchpad under `/dev/input` and notes when the
/// last event came. It needs read access to the devices (root, or the `input` group).
struct InputWatcher {
    last: Arc<Mutex<Option<Instant>>>,
    watching: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl InputWatcher {
    fn start(dev_input: PathBuf, sys_input: PathBuf) -> Option<Self> {
        let watcher = Self { last: Arc::default(), watching: Arc::default(), stop: Arc::default() };
        let (last, watching, stop) =
            (Arc::clone(&watcher.last), Arc::clone(&watcher.watching), Arc::clone(&watcher.stop));
        std::thread::Builder::new()
            .name("hearth-input".into())
            .spawn(move || watch_input(&dev_input, &sys_input, &last, &watching, &stop))
            .ok()?;
        Some(watcher)
    }

    /// Time since the last event; `None` while no device can be read.
    fn idle(&self) -> Option<Duration> {
        if !self.watching.load(Ordering::Relaxed) {
            return None;
        }
        // Watching but no event yet: idle since the watch began, which `watch_input` records.
        self.last.lock().ok().and_then(|last| *last).map(|at| at.elapsed())
    }
}

/// How often the device list is read again, for devices plugged in later.
const RESCAN: Duration = Duration::from_secs(30);

fn watch_input(
    dev_input: &Path,
    sys_input: &Path,
    last: &Mutex<Option<Instant>>,
    watching: &AtomicBool,
    stop: &AtomicBool,
) {
    use nix::fcntl::{OFlag, open};
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::stat::Mode;
    let mut devices: Vec<(String, OwnedFd)> = Vec::new();
    let mut scanned: Option<Instant> = None;
    let mut buffer = [0u8; 24 * 64];
    while !stop.load(Ordering::Relaxed) {
        if scanned.is_none_or(|at| at.elapsed() >= RESCAN) {
            scanned = Some(Instant::now());
            for name in human_input_devices(sys_input) {
                if devices.iter().any(|(open_name, _)| *open_name == name) {
                    continue;
                }
                let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
                if let Ok(fd) = open(&dev_input.join(&name), flags, Mode::empty()) {
                    devices.push((name, fd));
                }
            }
            let now_watching = !devices.is_empty();
            if now_watching && !watching.swap(true, Ordering::Relaxed) {
                // The owner's idle time counts from when we could first see.
                if let Ok(mut last) = last.lock() {
                    last.get_or_insert_with(Instant::now);
                }
            }
            watching.store(now_watching, Ordering::Relaxed);
        }
        if devices.is_empty() {
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        let mut fds: Vec<PollFd> =
            devices.iter().map(|(_, fd)| PollFd::new(fd.as_fd(), PollFlags::POLLIN)).collect();
        if poll(&mut fds, PollTimeout::from(1000u16)).unwrap_or(0) <= 0 {
            continue;
        }
        let ready: Vec<(bool, bool)> = fds
            .iter()
            .map(|fd| {
                let events = fd.revents().unwrap_or(PollFlags::empty());
                (
                    events.contains(PollFlags::POLLIN),
                    events.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL),
                )
            })
            .collect();
        drop(fds);
        let mut active = false;
        let mut gone = Vec::new();
        for (i, (readable, broken)) in ready.into_iter().enumerate() {
            if readable {
                while let Ok(n) = nix::unistd::read(&devices[i].1, &mut buffer) {
                    active |= n > 0;
                    if n == 0 {
                        break;
                    }
                }
            }
            if broken {
                gone.push(i);
            }
        }
        for i in gone.into_iter().rev() {
            devices.remove(i);
        }
        if active && let Ok(mut last) = last.lock() {
            *last = Some(Instant::now());
        }
    }
}

/// The `eventN` devices that a person drives: keyboards (many keys), mice (relative motion) and
/// touchpads and touchscreens (absolute position with touch), by the capability bitmaps in
/// `/sys/class/input/eventN/device/capabilities`. Sensors such as accelerometers, which report
/// all the time, and buttons such as the lid or power switch are left out.
pub fn human_input_devices(sys_input: &Path) -> Vec<String> {
    const EV_KEY: u32 = 1;
    const EV_REL: u32 = 2;
    const EV_ABS: u32 = 3;
    const KEY_A: u32 = 30;
    const BTN_TOUCH: u32 = 0x14a;
    let mut found = Vec::new();
    for entry in fs::read_dir(sys_input).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("event") {
            continue;
        }
        let caps = entry.path().join("device/capabilities");
        let bitmap = |file: &str| parse_bitmap(&fs::read_to_string(caps.join(file)).unwrap_or_default());
        let (ev, key) = (bitmap("ev"), bitmap("key"));
        let has = |bits: &[u64], bit: u32| {
            bits.get((bit / 64) as usize).is_some_and(|word| word >> (bit % 64) & 1 == 1)
        };
        let keyboard = has(&ev, EV_KEY) && has(&key, KEY_A);
        let mouse = has(&ev, EV_REL);
        let touch = has(&ev, EV_ABS) && has(&key, BTN_TOUCH);
        if keyboard || mouse || touch {
            found.push(name);
        }
    }
    found.sort();
    found
}

/// A sysfs capability bitmap: hexadecimal words, most significant first, separated by spaces;
/// returned least significant first.
fn parse_bitmap(text: &str) -> Vec<u64> {
    text.split_whitespace().rev().map(|word| u64::from_str_radix(word, 16).unwrap_or(0)).collect()
}

/// logind's idle hint for graphical and text sessions, through `loginctl`, read at most every
/// [`LOGIND_EVERY`].
#[derive(Default)]
struct Logind {
    last: Option<(Instant, Option<Duration>)>,
}

const LOGIND_EVERY: Duration = Duration::from_secs(15);

impl Logind {
    fn idle(&mut self) -> Option<Duration> {
        match self.last {
            Some((at, idle)) if at.elapsed() < LOGIND_EVERY => idle.map(|idle| idle + at.elapsed()),
            _ => {
                let idle = read_logind();
                self.last = Some((Instant::now(), idle));
                idle
            }
        }
    }
}

/// Where logind keeps one file per session, named by its id (what sd-login's `sd_get_sessions`
/// lists): reading it costs nothing, where starting `loginctl` costs a process.
const LOGIND_SESSIONS: &str = "/run/systemd/sessions";

fn read_logind() -> Option<Duration> {
    let ids = session_ids(Path::new(LOGIND_SESSIONS));
    if ids.is_empty() {
        // No session (a server, a container) or no logind: nothing to ask `loginctl`.
        return None;
    }
    let now_us = jiff::Timestamp::now().as_microsecond();
    ids.iter()
        .filter_map(|id| {
            let out = Command::new("loginctl")
                .args([
                    "show-session",
                    id,
                    "-p",
                    "IdleHint",
                    "-p",
                    "IdleSinceHint",
                    "-p",
                    "Type",
                    "-p",
                    "Active",
                ])
                .output()
                .ok()?;
            session_idle(&String::from_utf8_lossy(&out.stdout), now_us)
        })
        .min()
}

/// The session ids in logind's sessions folder (its `*.ref` files are FIFOs, not sessions).
fn session_ids(folder: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(folder) else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| !name.is_empty() && !name.contains('.'))
        .collect()
}

/// One session's idle time from `loginctl show-session` properties; `None` for a session that
/// says nothing about a person at the machine (inactive, or a remote or service session).
pub fn session_idle(properties: &str, now_us: i64) -> Option<Duration> {
    let get = |key: &str| properties.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix('='));
    if get("Active") != Some("yes") || !matches!(get("Type"), Some("x11" | "wayland" | "tty" | "mir")) {
        return None;
    }
    if get("IdleHint") != Some("yes") {
        return Some(Duration::ZERO);
    }
    let since: i64 = get("IdleSinceHint")?.parse().ok()?;
    Some(Duration::from_micros(u64::try_from(now_us - since).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::OpenOptionsExt;

    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/availability/fixtures").join(name)
    }

    #[test]
    fn power_supply_layouts() {
        assert_eq!(on_ac(&fixture("laptop-on-battery/power_supply")), Some(false));
        assert_eq!(on_ac(&fixture("laptop-on-ac/power_supply")), Some(true));
        // A desktop with a wireless mouse's battery: no machine battery, no rule.
        assert_eq!(on_ac(&fixture("desktop/power_supply")), None);
        assert_eq!(on_ac(Path::new("/nonexistent")), None);
    }

    #[test]
    fn hwmon_takes_the_hottest_cpu_sensor_only() {
        // The laptop's NVMe drive is hotter than its CPU and must not count.
        assert_eq!(cpu_celsius(&fixture("laptop-on-ac/hwmon")), Some(64.0));
        assert_eq!(cpu_celsius(&fixture("desktop/hwmon")), Some(71.5));
        assert_eq!(cpu_celsius(&fixture("laptop-on-battery/hwmon")), Some(48.0));
    }

    #[test]
    fn input_devices_are_keyboards_mice_and_touchpads() {
        // The lid switch, the power button and the accelerometer are left out.
        assert_eq!(human_input_devices(&fixture("laptop-on-ac/input")), ["event0", "event3", "event4"]);
    }

    #[test]
    fn the_input_watcher_sees_events_and_nothing_else() {
        // A FIFO stands in for /dev/input/event0, a keyboard by the fixture's capabilities.
        let dev = tempfile::tempdir().unwrap();
        let fifo = dev.path().join("event0");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let reports = Arc::default();
        let mut activity = Activity::new(dev.path(), fixture("laptop-on-ac/input"), reports);
        let policy = Policy::default();
        let mut signals = Signals::default();
        let until = Instant::now() + Duration::from_secs(5);
        let mut writer = loop {
            // The watcher opens the device on its first scan; a writer can open once it has.
            match fs::OpenOptions::new().write(true).custom_flags(nix::libc::O_NONBLOCK).open(&fifo) {
                Ok(writer) => break writer,
                Err(_) if Instant::now() < until => std::thread::sleep(Duration::from_millis(10)),
                Err(error) => panic!("the watcher never opened the device: {error}"),
            }
        };
        std::thread::sleep(Duration::from_millis(400));
        activity.sample(&policy, &mut signals);
        let quiet = signals.idle.expect("the watcher sees the device");
        assert!(quiet >= Duration::from_millis(300), "idle {quiet:?} without any event");
        std::io::Write::write_all(&mut writer, &[0u8; 24]).unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            activity.sample(&policy, &mut signals);
            if signals.idle.is_some_and(|idle| idle < Duration::from_millis(300)) {
                break;
            }
            assert!(Instant::now() < until, "an input event did not count as activity: {:?}", signals.idle);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn proc_stat_and_names() {
        let times = cpu_times(&fixture("desktop/proc")).unwrap();
        // user nice system idle iowait irq softirq steal
        assert_eq!(times.total, Duration::from_millis(9450 * 10));
        assert_eq!(times.busy, Duration::from_millis((9450 - 8000 - 100) * 10));
        let names = process_names(&fixture("desktop/proc"));
        assert!(names.contains(&"steam".to_owned()) && names.contains(&"blender".to_owned()), "{names:?}");
    }

    #[test]
    fn logind_sessions() {
        let now = 1_000_000_000_000;
        let graphical = "IdleHint=yes\nIdleSinceHint=999990000000\nType=wayland\nActive=yes\n";
        assert_eq!(session_idle(graphical, now), Some(Duration::from_secs(10)));
        assert_eq!(session_idle("IdleHint=no\nType=x11\nActive=yes\n", now), Some(Duration::ZERO));
        assert_eq!(session_idle("IdleHint=no\nType=unspecified\nActive=yes\n", now), None);
        assert_eq!(session_idle("IdleHint=no\nType=x11\nActive=no\n", now), None);
    }

    #[test]
    fn logind_session_ids_are_the_session_files() {
        let folder = tempfile::tempdir().unwrap();
        for name in ["2", "c1", "2.ref", "c1.ref"] {
            fs::write(folder.path().join(name), "").unwrap();
        }
        let mut ids = session_ids(folder.path());
        ids.sort();
        assert_eq!(ids, ["2", "c1"]);
        assert!(session_ids(&folder.path().join("absent")).is_empty(), "no logind, no sessions");
    }

    #[test]
    fn cpu_load_leaves_out_hearths_own_time() {
        let dir = tempfile::tempdir().unwrap();
        let write = |user: u64, idle: u64| {
            fs::write(dir.path().join("stat"), format!("cpu  {user} 0 0 {idle} 0 0 0 0 0 0\n")).unwrap()
        };
        let ours = Arc::new(Mutex::new(Duration::ZERO));
        let read_ours = Arc::clone(&ours);
        let mut load = CpuLoad::new(dir.path(), Box::new(move || Some(*read_ours.lock().unwrap())));
        let mut signals = Signals::default();
        write(0, 0);
        load.sample(&Policy::default(), &mut signals);
        assert_eq!(signals.foreign_cpu, None, "one sample is no rate");
        // 100 ticks pass: 60 busy, of which Hearth used 0.4 s.
        write(60, 40);
        *ours.lock().unwrap() = Duration::from_millis(400);
        load.sample(&Policy::default(), &mut signals);
        assert_eq!(signals.foreign_cpu, Some(20.0));
    }
}
