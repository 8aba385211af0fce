//! The availability task: samples the signals every second (and at once when the owner changes
//! something), runs the evaluator, publishes the result, and puts the owner first: when sharing
//! stops, every running job is frozen before anything else happens; when the pause outlasts the
//! policy's `stop_after`, the frozen jobs are stopped; when sharing returns, they thaw.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::availability::evaluate::{GpuSignal, Machine};
use crate::availability::signals::{self, Activity, CpuLoad, Hwmon, PowerSupply, ProcessTable, Source};
use crate::availability::{Availability, Memory, OwnerControls, Reason, Signals, evaluate};
use crate::events::{Bus, Event};
use crate::jobs::Supervisor;
use crate::jobs::sandbox::cgroup;
use crate::resources::Resources;

/// How often the signals are sampled when nothing wakes the task sooner.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// How often the process table is read when the policy names programs.
const PROCESSES_EVERY: Duration = Duration::from_secs(2);

/// Handle to the running task.
#[must_use = "dropping the handle leaves the task running until the daemon's token is cancelled"]
pub(crate) struct AvailabilityTask {
    availability: watch::Receiver<Availability>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Everything the task reads and drives.
pub(crate) struct Wiring {
    pub owner: Arc<OwnerControls>,
    pub resources: watch::Receiver<Resources>,
    pub sharing: watch::Sender<bool>,
    pub jobs: Supervisor,
    pub events: Bus,
    /// TEST SETTING `[testing] fake_gpus`: GPUs declared beside the real ones (UUID, memory).
    pub fake_gpus: Vec<(String, u64)>,
}

impl AvailabilityTask {
    /// Evaluates once (so jobs and the API start from a real answer), then keeps evaluating until
    /// `cancel` fires.
    pub(crate) async fn spawn(wiring: Wiring, cancel: &CancellationToken) -> Self {
        let mut state = TaskState::new(&wiring.owner);
        let first = state.step(&wiring).await;
        let (tx, availability) = watch::channel(first);
        let stop = cancel.child_token();
        let task_stop = stop.clone();
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(SAMPLE_EVERY);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                tokio::select! {
                    () = task_stop.cancelled() => break,
                    _ = ticks.tick() => {}
                    () = wiring.owner.changed() => {}
                }
                let fresh = state.step(&wiring).await;
                tx.send_replace(fresh);
            }
        });
        Self { availability, stop, task }
    }

    /// The latest answer.
    pub(crate) fn availability(&self) -> watch::Receiver<Availability> {
        self.availability.clone()
    }

    /// Stops the task and waits for it.
    pub(crate) async fn shutdown(self) {
        self.stop.cancel();
        if let Err(error) = self.task.await {
            tracing::error!(%error, "the availability task panicked");
        }
    }
}

struct TaskState {
    sources: Option<Vec<Box<dyn Source>>>,
    memory: Memory,
    last: Option<Availability>,
    /// The current pause has already stopped its jobs.
    stopped: bool,
}

impl TaskState {
    fn new(owner: &OwnerControls) -> Self {
        let hearth_cpu = Box::new(|| {
            let own = signals::own_cpu_time()?;
            Some(own + cgroup::jobs_cpu_time().unwrap_or_default())
        });
        let sources: Vec<Box<dyn Source>> = vec![
            Box::new(PowerSupply::new("/sys/class/power_supply")),
            Box::new(Hwmon::new("/sys/class/hwmon")),
            Box::new(CpuLoad::new("/proc", hearth_cpu)),
            Box::new(ProcessTable::new("/proc", PROCESSES_EVERY)),
            Box::new(Activity::new("/dev/input", "/sys/class/input", owner.reports())),
        ];
        Self { sources: Some(sources), memory: Memory::default(), last: None, stopped: false }
    }

    /// One round: sample, evaluate, publish a change, and act on it.
    async fn step(&mut self, wiring: &Wiring) -> Availability {
        let policy = wiring.owner.policy();
        let mut signals = Signals {
            owner_pause: wiring.owner.pause_state(),
            machine: machine(&wiring.resources.borrow(), &wiring.fake_gpus),
            ..Signals::default()
        };
        if let Some(mut sources) = self.sources.take() {
            let wanted = policy.clone();
            let sampled = tokio::task::spawn_blocking(move || {
                let mut signals = signals;
                for source in &mut sources {
                    source.sample(&wanted, &mut signals);
                }
                (sources, signals)
            })
            .await;
            match sampled {
                Ok((sources, sampled)) => {
                    self.sources = Some(sources);
                    signals = sampled;
                }
                Err(error) => std::panic::resume_unwind(error.into_panic()),
            }
        }
        let now = jiff::Timestamp::now();
        let availability = evaluate(&policy, &policy.time_zone(), &signals, now, &mut self.memory);

        let was_sharing = self.last.as_ref().is_none_or(Availability::is_sharing);
        match (&availability, was_sharing) {
            (Availability::Paused { reasons }, true) => {
                // Owner first: nothing may start, then everything running stops.
                wiring.sharing.send_replace(false);
                self.stopped = false;
                let reason = describe(reasons);
                tracing::info!(%reason, "sharing paused");
                wiring.jobs.owner_pause(&reason).await;
            }
            (Availability::Sharing { .. }, false) => {
                tracing::info!("sharing resumed");
                // First, or the supervisor would take the thawed jobs for late starters of the
                // pause and freeze them again.
                wiring.sharing.send_replace(true);
                wiring.jobs.owner_resume("sharing resumed").await;
            }
            (Availability::Sharing { .. }, true) if self.last.is_none() => {
                wiring.sharing.send_replace(true);
            }
            _ => {}
        }
        // After the thaw above: a job whose GPU is still paused alone stays frozen.
        if let Availability::Sharing { paused_gpus, .. } = &availability {
            wiring.jobs.gpu_pauses(paused_gpus).await;
        }
        if let Availability::Paused { reasons } = &availability
            && !self.stopped
            && self.memory.paused_since().is_some_and(|since| {
                Duration::try_from(now.duration_since(since))
                    .is_ok_and(|paused| paused >= policy.hysteresis.stop_after)
            })
        {
            self.stopped = true;
            let reason = format!(
                "stopped by the owner after a pause of {}: {}",
                humantime::format_duration(policy.hysteresis.stop_after),
                describe(reasons)
            );
            wiring.jobs.owner_stop(&reason).await;
        }
        if self.last.as_ref().is_none_or(|last| !same_shape(last, &availability)) {
            wiring.events.publish(Event::AvailabilityChanged { availability: availability.clone() });
        }
        self.last = Some(availability.clone());
        availability
    }
}

/// The machine's figures before reserves, from the resource monitor.
fn machine(resources: &Resources, fake_gpus: &[(String, u64)]) -> Machine {
    let real = resources.gpus.iter().map(|gpu| GpuSignal {
        uuid: gpu.uuid.clone(),
        index: gpu.index,
        memory_bytes: gpu.memory_total_bytes,
        celsius: gpu.temperature_c.map(|c| c as f32),
    });
    let fake = fake_gpus.iter().zip(resources.gpus.len() as u32..).map(|((uuid, memory_bytes), index)| {
        GpuSignal { uuid: uuid.clone(), index, memory_bytes: *memory_bytes, celsius: None }
    });
    Machine {
        cpu_millis: u64::from(resources.cpu.threads) * 1000,
        memory_bytes: resources.memory.total_bytes,
        gpus: real.chain(fake).collect(),
    }
}

/// The reasons, for people, on one line.
fn describe(reasons: &[Reason]) -> String {
    reasons.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// Whether two answers differ only in figures that move every second (idle seconds, degrees),
/// which are not worth an event each time.
fn same_shape(a: &Availability, b: &Availability) -> bool {
    match (a, b) {
        (
            Availability::Sharing { capacity: ca, paused_gpus: pa },
            Availability::Sharing { capacity: cb, paused_gpus: pb },
        ) => ca == cb && pa.iter().map(|g| &g.uuid).eq(pb.iter().map(|g| &g.uuid)),
        (Availability::Paused { reasons: ra }, Availability::Paused { reasons: rb }) => {
            ra.iter().map(std::mem::discriminant).eq(rb.iter().map(std::mem::discriminant))
        }
        _ => false,
    }
}
