//! The resource monitor: a task that re-reads the machine's figures on an interval and publishes
//! them on a watch channel and the event bus.
//!
//! Detection blocks (sysinfo reads /proc, NVML calls the driver), so each refresh runs on tokio's
//! blocking pool with the detector moved in and back out. The task stops on
//! [`Monitor::shutdown`] or when the daemon's cancellation token fires.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::events::{Bus, Event};
use crate::resources::{Detector, Resources};

/// Handle to the running monitor.
#[must_use = "dropping the handle leaves the monitor running until the daemon's token is cancelled"]
pub(crate) struct Monitor {
    resources: watch::Receiver<Resources>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Monitor {
    /// Reads the figures once (so the API never serves an empty model), then refreshes them every
    /// `interval` until `cancel` fires.
    pub(crate) async fn spawn(
        data_dir: PathBuf,
        interval: Duration,
        events: Bus,
        cancel: &CancellationToken,
    ) -> Self {
        let (mut detector, first) = refresh(None, data_dir.clone()).await;
        let (tx, resources) = watch::channel(first);
        let stop = cancel.child_token();
        let task_stop = stop.clone();
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await; // The first tick is immediate; the figures are fresh already.
            loop {
                tokio::select! {
                    () = task_stop.cancelled() => break,
                    _ = ticks.tick() => {}
                }
                let (back, fresh) = refresh(Some(detector), data_dir.clone()).await;
                detector = back;
                events.publish(Event::ResourcesRefreshed { resources: Box::new(fresh.clone()) });
                tx.send_replace(fresh);
            }
        });
        Self { resources, stop, task }
    }

    /// The latest figures, updated on every refresh.
    pub(crate) fn resources(&self) -> watch::Receiver<Resources> {
        self.resources.clone()
    }

    /// Stops the task and waits for it.
    pub(crate) async fn shutdown(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the resource monitor panicked");
        }
    }
}

/// Refreshes on the blocking pool, creating the detector first when there is none yet (loading
/// NVML blocks too). A panic inside detection is a bug; it is re-raised here, so it ends the task
/// and [`Monitor::shutdown`] logs it, while the API keeps serving the last figures.
async fn refresh(detector: Option<Detector>, data_dir: PathBuf) -> (Detector, Resources) {
    let joined = tokio::task::spawn_blocking(move || {
        let mut detector = detector.unwrap_or_default();
        let resources = detector.refresh(&data_dir);
        (detector, resources)
    })
    .await;
    match joined {
        Ok(pair) => pair,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
