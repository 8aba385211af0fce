//! The one evaluator: policy, signals and time in, `Sharing { capacity }` or `Paused { reasons }`
//! out. No I/O and no clock of its own, so every rule is table-tested on a simulated clock.
//!
//! What it remembers between calls (which state it is in and since when, when each condition
//! started, which sensors are latched hot, when each named program was last seen) is the
//! [`Memory`] the caller keeps and passes back.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;

pub use hearth_api::availability::{Availability, Capacity, GpuCapacity, GpuPause, OwnerPause, Reason};
use hearth_api::policy::{Policy, day_bit};

/// Everything measured about the machine and its owner at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Signals {
    /// The owner's explicit pause (`hearth pause`), and when it ends by itself.
    pub owner_pause: Option<OwnerPause>,
    /// Time since the owner last used keyboard, mouse or touchpad; `None` where nothing can tell.
    pub idle: Option<Duration>,
    /// Percent of all cores busy with anything but Hearth's jobs.
    pub foreign_cpu: Option<f32>,
    /// On mains power; `None` for a machine without a battery.
    pub on_ac: Option<bool>,
    /// The hottest CPU sensor.
    pub cpu_celsius: Option<f32>,
    /// Names of the running processes, lower-case.
    pub programs: Vec<String>,
    /// The machine's capacity before reserves.
    pub machine: Machine,
}

/// The machine's resources before reserves.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Machine {
    /// Logical CPUs × 1000.
    pub cpu_millis: u64,
    /// Physical memory.
    pub memory_bytes: u64,
    /// Each GPU.
    pub gpus: Vec<GpuSignal>,
}

/// One GPU as measured.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSignal {
    /// NVML UUID.
    pub uuid: String,
    /// NVML index.
    pub index: u32,
    /// Its memory.
    pub memory_bytes: u64,
    /// Its temperature.
    pub celsius: Option<f32>,
}

/// What the evaluator carries from one call to the next. Start with `Memory::default()`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Memory {
    /// Paused since then; `None` while sharing.
    paused_since: Option<Timestamp>,
    /// Sharing since then; `None` before the first evaluation or while paused.
    sharing_since: Option<Timestamp>,
    /// When each condition began to hold without a break, by its kind.
    holding_since: BTreeMap<&'static str, Timestamp>,
    /// The current pause has had the owner's pause as its only reason.
    owner_only: bool,
    /// Latched hot: the CPU, and GPUs by UUID.
    cpu_hot: bool,
    gpus_hot: Vec<String>,
    /// When each program of the policy was last seen running.
    programs_seen: BTreeMap<String, Timestamp>,
}

impl Memory {
    /// When the current pause began.
    pub fn paused_since(&self) -> Option<Timestamp> {
        self.paused_since
    }
}

/// The evaluator. `tz` is the policy's time zone (passed in so the caller resolves it once).
///
/// - Sharing → Paused: when a condition has held for the grace period (the owner's pause and a
///   closed window at once), and sharing has lasted its minimum (which never delays those two).
/// - Paused → Sharing: when no condition holds and the pause has lasted its minimum, or at once
///   when the only reason was the owner's pause and the owner has resumed.
/// - At start, any condition pauses at once: no job starts in the grace period.
pub fn evaluate(
    policy: &Policy,
    tz: &TimeZone,
    signals: &Signals,
    now: Timestamp,
    memory: &mut Memory,
) -> Availability {
    let conditions = conditions(policy, tz, signals, now, memory);
    let lasted =
        |since: Option<Timestamp>, length: Duration| since.is_some_and(|since| elapsed(since, now) >= length);

    // How long each condition has held; one that lapses starts over.
    memory.holding_since.retain(|kind, _| conditions.iter().any(|c| c.kind == *kind));
    for condition in &conditions {
        memory.holding_since.entry(condition.kind).or_insert(now);
    }

    let paused = match (memory.paused_since, memory.sharing_since) {
        (None, None) => !conditions.is_empty(),
        (None, Some(sharing_since)) => {
            let sharing_long_enough = lasted(Some(sharing_since), policy.hysteresis.min_sharing);
            conditions.iter().any(|c| {
                c.immediate
                    || sharing_long_enough
                        && lasted(memory.holding_since.get(c.kind).copied(), policy.hysteresis.grace)
            })
        }
        (Some(paused_since), _) => {
            // With no condition left, a pause that was the owner's alone ends with it.
            !conditions.is_empty()
                || !(memory.owner_only || lasted(Some(paused_since), policy.hysteresis.min_paused))
        }
    };

    if paused {
        let since = *memory.paused_since.get_or_insert(now);
        memory.sharing_since = None;
        memory.owner_only = conditions.iter().all(|c| c.kind == "owner_paused") && !conditions.is_empty()
            || memory.owner_only && conditions.is_empty();
        let mut reasons: Vec<Reason> = conditions.into_iter().map(|c| c.reason).collect();
        if reasons.is_empty() {
            let resumes_at = since.checked_add(policy.hysteresis.min_paused).unwrap_or(now);
            reasons.push(Reason::MinimumPause { resumes_at });
        }
        return Availability::Paused { reasons };
    }
    memory.paused_since = None;
    memory.owner_only = false;
    memory.sharing_since.get_or_insert(now);
    let (capacity, paused_gpus) = capacity(policy, signals, memory);
    Availability::Sharing { capacity, paused_gpus }
}

/// A condition against sharing.
struct Condition {
    /// Stable name, for the grace bookkeeping.
    kind: &'static str,
    /// Pauses at once, without grace or minimum sharing time.
    immediate: bool,
    reason: Reason,
}

fn conditions(
    policy: &Policy,
    tz: &TimeZone,
    signals: &Signals,
    now: Timestamp,
    memory: &mut Memory,
) -> Vec<Condition> {
    let mut found = Vec::new();
    let mut add = |kind, immediate, reason| found.push(Condition { kind, immediate, reason });
    if let Some(pause) = signals.owner_pause
        && pause.until.is_none_or(|until| now < until)
    {
        add("owner_paused", true, Reason::OwnerPaused { until: pause.until });
    }
    if !in_window(policy, tz, now) {
        add("outside_window", true, Reason::OutsideWindow);
    }
    if let Some(idle) = signals.idle
        && idle < policy.owner.idle
    {
        add("owner_active", false, Reason::OwnerActive { idle_seconds: idle.as_secs() });
    }
    if let Some(cpu) = signals.foreign_cpu
        && policy.owner.busy_cpu > 0.0
        && cpu >= policy.owner.busy_cpu
    {
        add("owner_busy", false, Reason::OwnerBusy { cpu_percent: cpu });
    }
    if policy.owner.only_on_ac && signals.on_ac == Some(false) {
        add("on_battery", false, Reason::OnBattery);
    }
    if let Some(celsius) = signals.cpu_celsius {
        let t = &policy.temperature;
        memory.cpu_hot = if memory.cpu_hot { celsius >= t.cpu_resume } else { celsius > t.cpu_pause };
        if memory.cpu_hot {
            add("cpu_too_hot", false, Reason::CpuTooHot { celsius });
        }
    }
    for wanted in &policy.owner.programs {
        let wanted = wanted.to_lowercase();
        if signals.programs.contains(&wanted) {
            memory.programs_seen.insert(wanted.clone(), now);
        }
        if let Some(seen) = memory.programs_seen.get(&wanted) {
            if elapsed(*seen, now) < policy.owner.program_cooldown {
                add("program", false, Reason::Program { name: wanted });
            } else {
                memory.programs_seen.remove(&wanted);
            }
        }
    }
    found
}

/// Whether `now` falls in one of the policy's windows, by the wall clock of `tz`. A window that
/// crosses midnight belongs to the day it starts on. Wall-clock times are compared, so on a day
/// with a DST change a window keeps its times and is an hour shorter or longer.
fn in_window(policy: &Policy, tz: &TimeZone, now: Timestamp) -> bool {
    if policy.windows.is_empty() {
        return true;
    }
    let local = now.to_zoned(tz.clone()).datetime();
    let (today, time) = (local.date(), local.time());
    let yesterday = today.yesterday().map(|d| day_bit(d.weekday())).unwrap_or(0);
    policy.windows.iter().filter_map(|window| window.parsed().ok()).any(|window| {
        let starts_today = window.days & day_bit(today.weekday()) != 0;
        if window.from < window.to {
            starts_today && window.from <= time && time < window.to
        } else {
            (starts_today && time >= window.from) || (window.days & yesterday != 0 && time < window.to)
        }
    })
}

/// The spans `[from, to)` in which the policy's windows let the machine share, from `now` for
/// `horizon`, merged and in order (what an advert tells consumers). Without windows, the whole
/// horizon. Other conditions (the owner's activity, temperatures) cannot be foreseen and are
/// left out.
pub fn upcoming_windows(
    policy: &Policy,
    tz: &TimeZone,
    now: Timestamp,
    horizon: Duration,
) -> Vec<(Timestamp, Timestamp)> {
    let end = now.checked_add(horizon).unwrap_or(now);
    if policy.windows.is_empty() {
        return vec![(now, end)];
    }
    let today = now.to_zoned(tz.clone()).date();
    let days = i64::try_from(horizon.as_secs() / 86_400).unwrap_or(0) + 1;
    let mut spans = Vec::new();
    for offset in -1..=days {
        let Ok(date) = today.checked_add(jiff::Span::new().days(offset)) else { continue };
        for window in policy.windows.iter().filter_map(|window| window.parsed().ok()) {
            if window.days & day_bit(date.weekday()) == 0 {
                continue;
            }
            let last_day = if window.from < window.to { Ok(date) } else { date.tomorrow() };
            let (Ok(from), Ok(last_day)) = (date.to_datetime(window.from).to_zoned(tz.clone()), last_day)
            else {
                continue;
            };
            let Ok(to) = last_day.to_datetime(window.to).to_zoned(tz.clone()) else { continue };
            let (from, to) = (from.timestamp().max(now), to.timestamp().min(end));
            if from < to {
                spans.push((from, to));
            }
        }
    }
    spans.sort();
    let mut merged: Vec<(Timestamp, Timestamp)> = Vec::new();
    for (from, to) in spans {
        match merged.last_mut() {
            Some(last) if from <= last.1 => last.1 = last.1.max(to),
            _ => merged.push((from, to)),
        }
    }
    merged
}

fn capacity(policy: &Policy, signals: &Signals, memory: &mut Memory) -> (Capacity, Vec<GpuPause>) {
    let keep = |total: u64, percent: f32| (total as f64 * (1.0 - f64::from(percent) / 100.0)) as u64;
    let machine = &signals.machine;
    let mut gpus = Vec::new();
    let mut paused_gpus = Vec::new();
    for gpu in &machine.gpus {
        let rule = policy
            .gpus
            .iter()
            .find(|rule| rule.uuid.as_deref() == Some(gpu.uuid.as_str()) || rule.index == Some(gpu.index));
        if rule.is_some_and(|rule| !rule.share) {
            continue;
        }
        let mut reasons = Vec::new();
        if rule.is_some_and(|rule| rule.pause) {
            reasons.push(Reason::GpuPausedByPolicy);
        }
        if let Some(celsius) = gpu.celsius {
            let t = &policy.temperature;
            let was_hot = memory.gpus_hot.contains(&gpu.uuid);
            let hot = if was_hot { celsius >= t.gpu_resume } else { celsius > t.gpu_pause };
            memory.gpus_hot.retain(|uuid| *uuid != gpu.uuid);
            if hot {
                memory.gpus_hot.push(gpu.uuid.clone());
                reasons.push(Reason::GpuTooHot { celsius });
            }
        }
        if reasons.is_empty() {
            gpus.push(GpuCapacity {
                uuid: gpu.uuid.clone(),
                memory_bytes: keep(gpu.memory_bytes, policy.reserve.gpu),
            });
        } else {
            paused_gpus.push(GpuPause { uuid: gpu.uuid.clone(), reasons });
        }
    }
    let capacity = Capacity {
        cpu_millis: keep(machine.cpu_millis, policy.reserve.cpu),
        memory_bytes: keep(machine.memory_bytes, policy.reserve.memory),
        gpus,
    };
    (capacity, paused_gpus)
}

fn elapsed(since: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(since)).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn policy(text: &str) -> Policy {
        Policy::parse(text, "test").unwrap()
    }

    /// A wall-clock time in Berlin.
    fn berlin(text: &str) -> Timestamp {
        format!("{text}[Europe/Berlin]").parse::<jiff::Zoned>().unwrap().timestamp()
    }

    fn idle_machine() -> Signals {
        Signals {
            idle: Some(Duration::from_secs(3600)),
            foreign_cpu: Some(3.0),
            on_ac: None,
            cpu_celsius: Some(50.0),
            machine: Machine { cpu_millis: 8000, memory_bytes: 32 * GIB, gpus: Vec::new() },
            ..Signals::default()
        }
    }

    /// Runs the evaluator once per second from `start` for `seconds`, with `signals_at(second)`,
    /// and returns the state name at each second.
    fn simulate(
        policy: &Policy,
        start: Timestamp,
        seconds: i64,
        signals_at: impl Fn(i64) -> Signals,
    ) -> Vec<&'static str> {
        let tz = policy.time_zone();
        let mut memory = Memory::default();
        (0..seconds)
            .map(|s| {
                evaluate(policy, &tz, &signals_at(s), start + jiff::SignedDuration::from_secs(s), &mut memory)
                    .name()
            })
            .collect()
    }

    fn at(policy: &Policy, when: Timestamp) -> Availability {
        evaluate(policy, &policy.time_zone(), &idle_machine(), when, &mut Memory::default())
    }

    #[test]
    fn windows_cross_midnight_and_keep_wall_clock_times_over_dst() {
        let nights = policy(
            "timezone = \"Europe/Berlin\"\n[[window]]\ndays = [\"sat\"]\nfrom = \"22:00\"\nto = \"07:00\"\n\
             [[window]]\ndays = [\"sun\"]\nfrom = \"01:30\"\nto = \"03:30\"\n",
        );
        let table = [
            // Saturday 28 March 2026; DST starts on Sunday 29 March at 02:00 (clocks jump to 03:00).
            ("2026-03-28T21:59", "paused"),
            ("2026-03-28T22:00", "sharing"),
            ("2026-03-28T23:59", "sharing"),
            // Past midnight: Saturday's window goes on into Sunday.
            ("2026-03-29T01:00", "sharing"),
            ("2026-03-29T06:59", "sharing"),
            ("2026-03-29T07:00", "paused"),
            // Saturday 24 October 2026; DST ends on Sunday 25 October at 03:00 (back to 02:00).
            ("2026-10-24T21:30", "paused"),
            ("2026-10-25T06:30", "sharing"),
            ("2026-10-25T07:00", "paused"),
            // Friday night is not in the window.
            ("2026-10-23T23:00", "paused"),
        ];
        for (when, expected) in table {
            assert_eq!(at(&nights, berlin(when)).name(), expected, "{when}");
        }
        // Sunday 01:30–03:30 by the wall clock: 1 h long on the spring-forward night (02:00–03:00
        // does not exist), 3 h long on the fall-back night (02:00–03:00 happens twice).
        let sunday_only = policy(
            "timezone = \"Europe/Berlin\"\n[[window]]\ndays = [\"sun\"]\nfrom = \"01:30\"\nto = \"03:30\"\n",
        );
        let sharing_minutes = |day: &str| {
            let start = berlin(&format!("{day}T00:00"));
            (0..6 * 60)
                .filter(|m| at(&sunday_only, start + jiff::SignedDuration::from_mins(*m)).is_sharing())
                .count()
        };
        assert_eq!(sharing_minutes("2026-03-29"), 60);
        assert_eq!(sharing_minutes("2026-10-25"), 180);
        assert_eq!(sharing_minutes("2026-06-07"), 120);
    }

    #[test]
    fn upcoming_windows_follow_the_wall_clock() {
        let nights = policy(
            "timezone = \"Europe/Berlin\"\n[[window]]\ndays = [\"all\"]\nfrom = \"22:00\"\nto = \"06:00\"\n",
        );
        let tz = nights.time_zone();
        // Friday 27 March 2026, 23:00 in Berlin: inside tonight's window; DST starts on Sunday.
        let now = berlin("2026-03-27T23:00");
        let spans = upcoming_windows(&nights, &tz, now, Duration::from_secs(3 * 86_400));
        let shown: Vec<(String, String)> = spans
            .iter()
            .map(|(from, to)| {
                let local = |t: &Timestamp| t.to_zoned(tz.clone()).strftime("%a %H:%M %Z").to_string();
                (local(from), local(to))
            })
            .collect();
        assert_eq!(
            shown,
            [
                ("Fri 23:00 CET".to_owned(), "Sat 06:00 CET".to_owned()),
                ("Sat 22:00 CET".to_owned(), "Sun 06:00 CEST".to_owned()),
                ("Sun 22:00 CEST".to_owned(), "Mon 06:00 CEST".to_owned()),
                // Three days of real time end at midnight on the wall clock: one hour was skipped.
                ("Mon 22:00 CEST".to_owned(), "Tue 00:00 CEST".to_owned()),
            ]
        );
        // The spring-forward night is an hour shorter in real time.
        assert_eq!(spans[1].1.duration_since(spans[1].0).as_hours(), 7);
        let always = upcoming_windows(&Policy::default(), &tz, now, Duration::from_secs(86_400));
        assert_eq!(always, [(now, now + jiff::SignedDuration::from_hours(24))]);
    }

    #[test]
    fn a_one_second_spike_does_not_flap() {
        let policy = policy("[hysteresis]\ngrace = \"2s\"\nmin_paused = \"10s\"\n");
        let start = berlin("2026-06-10T12:00");
        // Foreign CPU load spikes for one second at 5 s, then for 4 s from 20 s.
        let states = simulate(&policy, start, 40, |s| Signals {
            foreign_cpu: Some(if s == 5 || (20..24).contains(&s) { 95.0 } else { 3.0 }),
            ..idle_machine()
        });
        assert!(states[..20].iter().all(|s| *s == "sharing"), "{states:?}");
        // The long spike pauses after its grace, and the pause lasts its minimum of 10 s.
        assert_eq!(states[21], "sharing");
        assert_eq!(states[22], "paused");
        assert!(states[22..32].iter().all(|s| *s == "paused"), "{states:?}");
        assert_eq!(states[32], "sharing");
    }

    #[test]
    fn the_owner_comes_first_and_is_waited_for() {
        let policy = policy("[owner]\nidle = \"60s\"\n[hysteresis]\ngrace = \"2s\"\nmin_paused = \"5s\"\n");
        let start = berlin("2026-06-10T12:00");
        // The owner touches the mouse at 10 s and then leaves the machine alone.
        let states = simulate(&policy, start, 90, |s| Signals {
            idle: Some(Duration::from_secs(if s < 10 { 600 } else { (s - 10) as u64 })),
            ..idle_machine()
        });
        assert_eq!(&states[9..13], ["sharing", "sharing", "sharing", "paused"]);
        // Paused until the owner has been idle for the full minute.
        assert!(states[12..70].iter().all(|s| *s == "paused"), "{states:?}");
        assert_eq!(states[70], "sharing");

        // The owner's own pause is immediate, and so is its end.
        let mut memory = Memory::default();
        let tz = policy.time_zone();
        let paused = Signals { owner_pause: Some(OwnerPause { until: None }), ..idle_machine() };
        assert!(evaluate(&policy, &tz, &idle_machine(), start, &mut memory).is_sharing());
        let now = start + jiff::SignedDuration::from_secs(1);
        assert_eq!(
            evaluate(&policy, &tz, &paused, now, &mut memory),
            Availability::Paused { reasons: vec![Reason::OwnerPaused { until: None }] }
        );
        let now = start + jiff::SignedDuration::from_secs(2);
        assert!(evaluate(&policy, &tz, &idle_machine(), now, &mut memory).is_sharing());
        // A pause with an end lapses by itself.
        let until = start + jiff::SignedDuration::from_secs(30);
        let timed = Signals { owner_pause: Some(OwnerPause { until: Some(until) }), ..idle_machine() };
        assert!(
            !evaluate(&policy, &tz, &timed, start + jiff::SignedDuration::from_secs(29), &mut memory)
                .is_sharing()
        );
        assert!(
            evaluate(&policy, &tz, &timed, start + jiff::SignedDuration::from_secs(31), &mut memory)
                .is_sharing()
        );
    }

    #[test]
    fn reserves_shrink_the_offered_capacity() {
        let policy = policy("[reserve]\ncpu = 25\nmemory = 50\ngpu = 10\n");
        let mut signals = idle_machine();
        signals.machine.gpus =
            vec![GpuSignal { uuid: "GPU-a".into(), index: 0, memory_bytes: 10 * GIB, celsius: Some(40.0) }];
        let Availability::Sharing { capacity, paused_gpus } = evaluate(
            &policy,
            &policy.time_zone(),
            &signals,
            berlin("2026-06-10T12:00"),
            &mut Memory::default(),
        ) else {
            panic!("not sharing")
        };
        assert_eq!(capacity.cpu_millis, 6000);
        assert_eq!(capacity.memory_bytes, 16 * GIB);
        assert_eq!(capacity.gpus, [GpuCapacity { uuid: "GPU-a".into(), memory_bytes: 9 * GIB }]);
        assert!(paused_gpus.is_empty());
    }

    #[test]
    fn one_gpu_pauses_alone() {
        let policy = policy(
            "[temperature]\ngpu_pause = 85\ngpu_resume = 75\n\
             [[gpu]]\nindex = 2\nshare = false\n[[gpu]]\nuuid = \"GPU-c\"\npause = true\n",
        );
        let gpu = |uuid: &str, index, celsius| GpuSignal {
            uuid: uuid.into(),
            index,
            memory_bytes: GIB,
            celsius: Some(celsius),
        };
        let tz = policy.time_zone();
        let mut memory = Memory::default();
        let mut signals = idle_machine();
        let now = berlin("2026-06-10T12:00");
        let mut offered = |a: f32, b: f32, memory: &mut Memory| {
            signals.machine.gpus =
                vec![gpu("GPU-a", 0, a), gpu("GPU-b", 1, b), gpu("GPU-x", 2, 30.0), gpu("GPU-c", 3, 30.0)];
            match evaluate(&policy, &tz, &signals, now, memory) {
                Availability::Sharing { capacity, paused_gpus } => (
                    capacity.gpus.into_iter().map(|g| g.uuid).collect::<Vec<_>>(),
                    paused_gpus.into_iter().map(|g| g.uuid).collect::<Vec<_>>(),
                ),
                other => panic!("{other:?}"),
            }
        };
        // GPU-x (index 2) is never offered, GPU-c is paused by the policy; GPU-b is too hot.
        assert_eq!(
            offered(60.0, 90.0, &mut memory),
            (vec!["GPU-a".to_owned()], vec!["GPU-b".to_owned(), "GPU-c".to_owned()])
        );
        // Cooling to 80 °C is not enough: it resumes below 75 °C.
        assert_eq!(offered(60.0, 80.0, &mut memory).0, ["GPU-a"]);
        assert_eq!(offered(60.0, 74.0, &mut memory).0, ["GPU-a", "GPU-b"]);
    }

    #[test]
    fn named_programs_pause_until_their_cooldown_ends() {
        let policy = policy(
            "[owner]\nprograms = [\"Steam\"]\nprogram_cooldown = \"30s\"\n[hysteresis]\ngrace = \"1s\"\nmin_paused = \"0s\"\n",
        );
        let start = berlin("2026-06-10T20:00");
        // The game runs from 5 s to 20 s.
        let states = simulate(&policy, start, 60, |s| Signals {
            programs: if (5..20).contains(&s) { vec!["steam".into()] } else { vec!["bash".into()] },
            ..idle_machine()
        });
        assert_eq!(&states[4..7], ["sharing", "sharing", "paused"]);
        // Still paused 30 s after the exit at 20 s (last seen at 19 s), sharing after.
        assert!(states[6..49].iter().all(|s| *s == "paused"), "{states:?}");
        assert_eq!(states[49], "sharing");
    }

    #[test]
    fn battery_and_heat_pause_with_their_reasons() {
        let policy = policy(
            "[temperature]\ncpu_pause = 90\ncpu_resume = 80\n[hysteresis]\ngrace = \"0s\"\nmin_paused = \"0s\"\n",
        );
        let tz = policy.time_zone();
        let now = berlin("2026-06-10T12:00");
        let mut memory = Memory::default();
        let hot = Signals { on_ac: Some(false), cpu_celsius: Some(95.0), ..idle_machine() };
        assert_eq!(
            evaluate(&policy, &tz, &hot, now, &mut memory),
            Availability::Paused { reasons: vec![Reason::OnBattery, Reason::CpuTooHot { celsius: 95.0 }] }
        );
        let cooling = Signals { on_ac: Some(true), cpu_celsius: Some(85.0), ..idle_machine() };
        assert!(
            !evaluate(&policy, &tz, &cooling, now, &mut memory).is_sharing(),
            "85 °C is above the resume line"
        );
        let cool = Signals { cpu_celsius: Some(79.0), ..cooling };
        assert!(evaluate(&policy, &tz, &cool, now, &mut memory).is_sharing());
    }
}
