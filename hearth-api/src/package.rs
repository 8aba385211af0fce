//! The request package: several resources, each one machine, asked for in one request, with
//! `after` dependencies between them and the tasks (job specs) to run on each.
//!
//! Parsing follows the job spec ([`crate::spec`]): the TOML is read into a raw form that
//! mirrors the file, then validated into a [`Package`]. Validation collects every problem rather
//! than stopping at the first, each naming its dotted field. Every task's job spec is loaded and
//! checked against the resource it runs on, so a package that parses can be acquired as written.
//!
//! A submitted package becomes a request, whose progress the API shows as a [`RequestStatus`]:
//! each resource's acquisition and each task's state.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{JobId, RequestId};
use crate::local_file::{self, FileError};
use crate::market::Prices;
use crate::resources::Allocation;
use crate::spec::{JobSpec, Problem, SpecError};
use crate::toml_file;
use crate::upload::MAX_SPEC_BYTES;

/// The most resources one package may have.
pub const MAX_RESOURCES: usize = 32;

/// The most tasks one package may have.
pub const MAX_TASKS: usize = 256;

/// The most retries after a failed acquisition.
const MAX_RETRIES: u32 = 20;

/// The most GPUs one resource (one machine) may have.
const MAX_GPUS: u32 = 64;

/// The highest price ceiling a resource may name, in credits per hour.
const MAX_PRICE: f64 = 1_000_000.0;

/// The least memory or disk a resource may have.
const MIN_BYTES: u64 = 1 << 20;

/// The longest resource name.
const MAX_NAME: usize = 64;

/// A validated package, ready to acquire and run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// A name for people, if the file gives one.
    pub name: Option<String>,
    /// In acquisition order: wave by wave (see [`Package::waves`]), alphabetical within a wave,
    /// so every resource comes after all it depends on (the TOML reader keeps no table order).
    pub resources: Vec<Resource>,
    /// In file order.
    pub tasks: Vec<Task>,
    /// Tries after the first failed acquisition of a resource.
    pub retries: u32,
    /// Wait before the first retry in milliseconds; it doubles with each retry.
    pub backoff_ms: u64,
    /// How long a provider holds an idle reservation before it lapses unless renewed, in seconds.
    pub hold_s: u64,
}

/// One resource of a package: what one machine must set aside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    /// Its name in the package.
    pub name: String,
    /// What the machine must set aside (`vram_bytes` is 0).
    pub demand: Allocation,
    /// Names of the resources acquired, and whose tasks finish, before this one.
    pub after: Vec<String>,
    /// Whether tasks on it may open outbound connections.
    pub network: bool,
    /// The most it may cost, in thousandths of a credit per hour; any price when absent.
    pub max_price_per_hour: Option<u64>,
    /// The sum of its tasks' time limits in seconds: how long the machine may be needed when its
    /// tasks run one after another.
    pub time_s: u64,
}

/// One task: a job spec to run on a resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// The name of the resource it runs on.
    pub resource: String,
    /// The job spec file, absolute.
    pub spec_path: PathBuf,
}

/// Why a package was refused.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// The file could not be read: missing, not a regular file, or too large.
    #[error(transparent)]
    Read(#[from] FileError),
    /// The TOML does not have the package's shape; names the field.
    #[error("package {}: {message}", local_file::shown(.path))]
    Parse {
        /// The package file.
        path: PathBuf,
        /// The field and what was expected, on one line.
        message: String,
    },
    /// The values are well-formed but not acceptable.
    #[error("package {}: {}", local_file::shown(.path), joined(.problems))]
    Invalid {
        /// The package file.
        path: PathBuf,
        /// Every problem found, each naming its field.
        problems: Vec<Problem>,
    },
}

fn joined(problems: &[Problem]) -> String {
    problems.iter().map(Problem::to_string).collect::<Vec<_>>().join("; ")
}

impl Package {
    /// Reads and validates the package at `path`; spec paths in it are relative to its folder.
    pub fn load(path: &Path) -> Result<Self, PackageError> {
        let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Self::load_in(path, base)
    }

    /// Reads and validates the package at `path`; spec paths in it are relative to `base`.
    pub fn load_in(path: &Path, base: &Path) -> Result<Self, PackageError> {
        let text = local_file::read_text(path, MAX_SPEC_BYTES as u64, "package")?;
        Self::parse(&text, path, base)
    }

    /// Parses and validates package text; `path` names it in errors, `base` resolves spec paths.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Self, PackageError> {
        let raw: RawPackage = toml_file::parse(text)
            .map_err(|message| PackageError::Parse { path: path.to_owned(), message })?;
        raw.validate(base).map_err(|problems| PackageError::Invalid { path: path.to_owned(), problems })
    }

    /// Acquisition waves, as indices into `resources`: every resource of a wave depends only on
    /// resources of earlier waves, so a wave's resources may be acquired in parallel. Names in
    /// `after` that are not resources are ignored; resources caught in a cycle (only possible in a
    /// package not made by [`Package::parse`]) form one last wave.
    pub fn waves(&self) -> Vec<Vec<usize>> {
        waves_of(&self.resources)
    }

    /// Indices into `tasks` of the tasks on resource `name`, in file order.
    pub fn tasks_on(&self, name: &str) -> Vec<usize> {
        self.tasks.iter().enumerate().filter(|(_, task)| task.resource == name).map(|(i, _)| i).collect()
    }
}

/// Whether TOML text is a package rather than a single job spec: it has a top-level `tasks`
/// array, or a non-empty `resources` table whose values are all tables. Malformed TOML is not a
/// package (reading it as a job spec reports what is wrong).
pub fn is_package(text: &str) -> bool {
    let Ok(table) = text.parse::<toml::Table>() else { return false };
    let all_tables = |table: &toml::Table| !table.is_empty() && table.values().all(toml::Value::is_table);
    table.get("tasks").is_some_and(toml::Value::is_array)
        || table.get("resources").and_then(toml::Value::as_table).is_some_and(all_tables)
}

/// See [`Package::waves`].
fn waves_of(resources: &[Resource]) -> Vec<Vec<usize>> {
    let index: HashMap<&str, usize> =
        resources.iter().enumerate().map(|(i, resource)| (resource.name.as_str(), i)).collect();
    let mut placed = vec![false; resources.len()];
    let mut waves: Vec<Vec<usize>> = Vec::new();
    while placed.iter().any(|placed| !placed) {
        let ready: Vec<usize> = (0..resources.len())
            .filter(|&i| {
                !placed[i]
                    && resources[i]
                        .after
                        .iter()
                        .all(|dep| index.get(dep.as_str()).is_none_or(|&j| j == i || placed[j]))
            })
            .collect();
        if ready.is_empty() {
            waves.push((0..resources.len()).filter(|&i| !placed[i]).collect());
            break;
        }
        for &i in &ready {
            placed[i] = true;
        }
        waves.push(ready);
    }
    waves
}

/// A package exactly as written in TOML.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawPackage {
    name: Option<String>,
    retries: u32,
    backoff: String,
    hold: String,
    resources: BTreeMap<String, RawResource>,
    tasks: Vec<RawTask>,
}

impl Default for RawPackage {
    fn default() -> Self {
        Self {
            name: None,
            retries: 3,
            backoff: "1s".to_owned(),
            hold: "10m".to_owned(),
            resources: BTreeMap::new(),
            tasks: Vec::new(),
        }
    }
}

/// `[resources.NAME]` as written.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawResource {
    cpu: f64,
    memory: String,
    disk: String,
    gpus: u32,
    max_price: Option<f64>,
    network: bool,
    after: Vec<String>,
}

impl Default for RawResource {
    fn default() -> Self {
        let (memory, disk) = ("256MiB".to_owned(), "1GiB".to_owned());
        Self { cpu: 1.0, memory, disk, gpus: 0, max_price: None, network: false, after: Vec::new() }
    }
}

/// `[[tasks]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    resource: String,
    spec: PathBuf,
}

/// The problems found so far. A refused value is replaced by zero, which is never used: a package
/// with a problem is refused.
#[derive(Default)]
struct Report(Vec<Problem>);

impl Report {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem { field: field.into(), message: message.into() });
    }

    fn size(&mut self, field: String, text: &str) -> Option<u64> {
        let expected = match text.trim().parse::<bytesize::ByteSize>() {
            Ok(size) if size.as_u64() >= MIN_BYTES => return Some(size.as_u64()),
            Ok(_) => "at least 1MiB",
            Err(_) => "a size such as \"256MiB\" or \"2GiB\"",
        };
        self.add(field, format!("is {text:?}; expected {expected}"));
        None
    }

    /// `text` as a duration from `min` to `max`, which `range` puts in words.
    fn duration(&mut self, field: &str, text: &str, min: Duration, max: Duration, range: &str) -> Duration {
        let expected = match humantime::parse_duration(text.trim()) {
            Ok(duration) if (min..=max).contains(&duration) => return duration,
            Ok(_) => range,
            Err(_) => "a duration such as \"1s\" or \"500ms\"",
        };
        self.add(field, format!("is {text:?}; expected {expected}"));
        Duration::ZERO
    }
}

impl RawPackage {
    /// Validates every field and loads every task's spec from `base`; returns every problem found.
    fn validate(self, base: &Path) -> Result<Package, Vec<Problem>> {
        let mut report = Report::default();
        if self.retries > MAX_RETRIES {
            report.add("retries", format!("is {}; expected at most {MAX_RETRIES}", self.retries));
        }
        let (ms, s) = (Duration::from_millis, Duration::from_secs);
        let backoff = report.duration("backoff", &self.backoff, ms(10), s(600), "from 10ms to 10m");
        let hold = report.duration("hold", &self.hold, s(1), s(3600), "from 1s to 1h");

        match self.resources.len() {
            0 => report.add("resources", "is empty; expected at least one `[resources.NAME]` table"),
            n if n > MAX_RESOURCES => {
                report.add("resources", format!("has {n} resources; expected at most {MAX_RESOURCES}"))
            }
            _ => {}
        }
        // Each resource, and whether its demand is valid (so tasks can be checked against it).
        let mut resources: BTreeMap<&str, (Resource, bool)> = BTreeMap::new();
        for (name, raw) in &self.resources {
            let valid = (1..=MAX_NAME).contains(&name.len())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid {
                let expected = format!("expected 1 to {MAX_NAME} letters, digits, '_' or '-'");
                report.add("resources", format!("has a resource named {name:?}; {expected}"));
            }
            resources.insert(name, raw.check(name, &self.resources, &mut report));
        }
        for cycle in cycles(&resources) {
            let cycle = cycle.join(" -> ");
            report.add("resources", format!("have a dependency cycle: {cycle} (each is after the next)"));
        }

        match self.tasks.len() {
            0 => report.add("tasks", "is empty; expected at least one `[[tasks]]` table"),
            n if n > MAX_TASKS => report.add("tasks", format!("has {n} tasks; expected at most {MAX_TASKS}")),
            _ => {}
        }
        let mut tasks = Vec::new();
        let mut used = BTreeSet::new();
        for (i, raw) in self.tasks.iter().enumerate() {
            let field = format!("tasks[{i}]");
            let resource = resources.get_mut(raw.resource.as_str());
            if resource.is_some() {
                used.insert(raw.resource.as_str());
            } else {
                let message = format!("names {:?}, which is not a resource of this package", raw.resource);
                report.add(format!("{field}.resource"), message);
            }
            let Some((spec_path, spec)) = load_spec(&mut report, &field, base, &raw.spec) else { continue };
            if let Some((holds, valid)) = resource {
                if *valid {
                    fits(&mut report, &field, holds, &spec);
                }
                let time = spec.limits.time;
                holds.time_s += time.as_secs() + u64::from(time.subsec_nanos() > 0);
            }
            tasks.push(Task { resource: raw.resource.clone(), spec_path });
        }
        // With no task at all, that problem alone is reported.
        for name in resources.keys().filter(|name| !self.tasks.is_empty() && !used.contains(*name)) {
            let message = "has no task; a resource no task runs on would be held for nothing";
            report.add(format!("resources.{name}"), message);
        }

        if !report.0.is_empty() {
            return Err(report.0);
        }
        let resources: Vec<Resource> = resources.into_values().map(|(resource, _)| resource).collect();
        let mut slots: Vec<Option<Resource>> = resources.iter().cloned().map(Some).collect();
        Ok(Package {
            name: self.name,
            resources: waves_of(&resources).concat().into_iter().filter_map(|i| slots[i].take()).collect(),
            tasks,
            retries: self.retries,
            backoff_ms: backoff.as_millis() as u64,
            hold_s: hold.as_secs(),
        })
    }
}

impl RawResource {
    /// Checks the resource called `name` (`all` are the package's, for `after`); the resource,
    /// and whether its demand is valid.
    fn check(
        &self,
        name: &str,
        all: &BTreeMap<String, RawResource>,
        report: &mut Report,
    ) -> (Resource, bool) {
        let field = |part: &str| format!("resources.{name}.{part}");
        let cpu = self.cpu;
        let cpu_millis = if (0.001..=1024.0).contains(&cpu) {
            Some((cpu * 1000.0).round() as u64)
        } else {
            report.add(field("cpu"), format!("is {cpu}; expected a number of cores between 0.001 and 1024"));
            None
        };
        let memory_bytes = report.size(field("memory"), &self.memory);
        let disk_bytes = report.size(field("disk"), &self.disk);
        let gpus = if self.gpus <= MAX_GPUS {
            Some(self.gpus)
        } else {
            report.add(
                field("gpus"),
                format!("is {}; expected at most {MAX_GPUS} GPUs on one machine", self.gpus),
            );
            None
        };
        let max_price_per_hour = self.max_price.and_then(|price| {
            if price.is_finite() && (0.0..=MAX_PRICE).contains(&price) {
                return Some((price * 1000.0).round() as u64);
            }
            report.add(
                field("max_price"),
                format!("is {price}; expected credits per hour from 0 to {MAX_PRICE}"),
            );
            None
        });
        let mut after = Vec::new();
        for dep in &self.after {
            if dep == name {
                report.add(field("after"), "names itself; a resource cannot be after itself");
            } else if !all.contains_key(dep) {
                report.add(field("after"), format!("names {dep:?}, which is not a resource of this package"));
            } else if !after.contains(dep) {
                after.push(dep.clone());
            }
        }
        let demand = match (cpu_millis, memory_bytes, disk_bytes, gpus) {
            (Some(cpu_millis), Some(memory_bytes), Some(disk_bytes), Some(gpus)) => {
                Some(Allocation { cpu_millis, memory_bytes, disk_bytes, gpus, vram_bytes: 0 })
            }
            _ => None,
        };
        let resource = Resource {
            name: name.to_owned(),
            demand: demand.unwrap_or_default(),
            after,
            network: self.network,
            max_price_per_hour,
            time_s: 0,
        };
        (resource, demand.is_some())
    }
}

/// Dependency cycles, following `after`: for each resource, the shortest cycle through it among
/// resources no smaller, so each cycle found starts at its alphabetically smallest member.
fn cycles<'a>(resources: &BTreeMap<&'a str, (Resource, bool)>) -> Vec<Vec<&'a str>> {
    let names: Vec<&str> = resources.keys().copied().collect();
    let deps: Vec<Vec<usize>> = resources
        .values()
        .map(|(resource, _)| {
            let mut deps: Vec<usize> =
                resource.after.iter().filter_map(|dep| names.binary_search(&dep.as_str()).ok()).collect();
            deps.sort_unstable();
            deps
        })
        .collect();
    let mut found = Vec::new();
    for start in 0..names.len() {
        // Breadth first, so the first edge back to `start` closes the shortest cycle.
        let mut parent: Vec<Option<usize>> = vec![None; names.len()];
        let mut queue = VecDeque::from([start]);
        'search: while let Some(u) = queue.pop_front() {
            for &v in &deps[u] {
                if v == start {
                    let mut path = vec![names[start]];
                    let mut at = Some(u);
                    while let Some(u) = at.filter(|&u| u != start) {
                        path.insert(1, names[u]);
                        at = parent[u];
                    }
                    path.push(names[start]);
                    found.push(path);
                    break 'search;
                }
                if v > start && parent[v].is_none() {
                    parent[v] = Some(u);
                    queue.push_back(v);
                }
            }
        }
    }
    found
}

/// Loads the spec of the task at `field`; its problems become the task's.
fn load_spec(report: &mut Report, field: &str, base: &Path, spec: &Path) -> Option<(PathBuf, JobSpec)> {
    let field = format!("{field}.spec");
    let path = base.join(spec);
    match JobSpec::load(&path) {
        Ok(job) => match path.canonicalize() {
            Ok(absolute) => return Some((absolute, job)),
            Err(e) => {
                report.add(field, format!("names {}, which cannot be opened: {e}", local_file::shown(&path)))
            }
        },
        Err(SpecError::Read(error)) => {
            report.add(field, format!("names {}, which {}", local_file::shown(&path), error.reason()))
        }
        Err(SpecError::Parse { message, .. }) => {
            report.add(field, format!("{}: {message}", local_file::shown(spec)))
        }
        Err(SpecError::Invalid { problems, .. }) => {
            for problem in problems {
                report.add(field.clone(), format!("{}: {problem}", local_file::shown(spec)));
            }
        }
    }
    None
}

/// Reports what the task at `field` asks for beyond what its resource `holds`.
fn fits(report: &mut Report, field: &str, holds: &Resource, spec: &JobSpec) {
    let name = &holds.name;
    if spec.limits.network && !holds.network {
        report.add(field, format!("asks for outbound network; resource {name:?} has `network = false`"));
    }
    let (asks, holds) = (spec.resources, holds.demand);
    let mut over = |asks: String, holds: String| {
        report.add(field, format!("asks for {asks}; resource {name:?} holds {holds}"));
    };
    if u64::from(asks.cpu_millis) > holds.cpu_millis {
        over(count(asks.cpu_millis.into(), "core"), count(holds.cpu_millis, "core"));
    }
    if asks.memory_bytes > holds.memory_bytes {
        over(format!("{} of memory", size(asks.memory_bytes)), size(holds.memory_bytes));
    }
    if asks.disk_bytes > holds.disk_bytes {
        over(format!("{} of disk", size(asks.disk_bytes)), size(holds.disk_bytes));
    }
    if asks.gpus > holds.gpus {
        over(count(u64::from(asks.gpus) * 1000, "GPU"), count(u64::from(holds.gpus) * 1000, "GPU"));
    }
}

/// `thousandths` of `unit`, such as "1 core", "2.5 cores" or "0 GPUs".
fn count(thousandths: u64, unit: &str) -> String {
    let plural = if thousandths == 1000 { "" } else { "s" };
    format!("{} {unit}{plural}", thousandths as f64 / 1000.0)
}

/// Bytes in the largest binary unit that divides them, such as "2GiB" or "1536MiB".
fn size(bytes: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

/// Where a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    /// On the queue, not started.
    Queued,
    /// Its resources are being acquired.
    Acquiring,
    /// All acquired; its tasks run.
    Running,
    /// Its tasks ended; the reservations are being released.
    Releasing,
    /// Every task succeeded and everything was released.
    Completed,
    /// A task failed; everything was released.
    Failed,
    /// A resource could not be acquired; what was acquired was released in reverse order.
    RolledBack,
}

impl RequestState {
    /// Whether nothing more happens to it.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::RolledBack)
    }

    /// Its name, as in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Acquiring => "acquiring",
            Self::Running => "running",
            Self::Releasing => "releasing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::RolledBack => "rolled_back",
        }
    }
}

/// Where one resource's acquisition is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HoldState {
    /// Not asked yet (or asked again after a refusal).
    Waiting,
    /// An ask is out; its answer is not recorded yet.
    Asking,
    /// The provider holds it.
    Held,
    /// Released to the provider.
    Released,
    /// The provider let it lapse (it was not kept in time).
    Lapsed,
    /// Not acquired after every try.
    Failed,
}

impl HoldState {
    /// Its name, as in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Asking => "asking",
            Self::Held => "held",
            Self::Released => "released",
            Self::Lapsed => "lapsed",
            Self::Failed => "failed",
        }
    }
}

/// One resource of a request and its acquisition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Acquisition {
    /// The package's name for it.
    pub resource: String,
    /// Where its acquisition is.
    pub state: HoldState,
    /// The provider asked or holding it.
    pub provider: Option<String>,
    /// The reservation's id (chosen here before asking).
    pub reservation_id: Option<String>,
    /// Tries so far.
    pub attempts: u32,
    /// Why the last try failed.
    pub error: Option<String>,
    /// 1 for the first resource acquired, 2 for the next…: rollback releases in reverse.
    pub order: Option<u32>,
    /// The prices the provider's tasks are offered at.
    #[schema(value_type = Option<Object>)]
    pub prices: Option<Prices>,
    /// The GPUs held, by UUID.
    pub gpus: Vec<String>,
    /// When it was acquired, in Unix milliseconds.
    pub acquired_at_ms: Option<i64>,
    /// When it was released or lapsed, in Unix milliseconds.
    pub released_at_ms: Option<i64>,
}

/// Where one task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Not started.
    Waiting,
    /// Its remote job runs.
    Running,
    /// Its job finished with exit code 0.
    Succeeded,
    /// Its job did not finish well.
    Failed,
    /// Not run: an earlier task failed, or the resources were not acquired.
    Skipped,
}

impl TaskState {
    /// Its name, as in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }
}

/// One task of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskStatus {
    /// Its place in the package's `tasks`.
    pub index: u32,
    /// The resource it runs on.
    pub resource: String,
    /// Its job spec.
    #[schema(value_type = String)]
    pub spec_path: PathBuf,
    /// Where it is.
    pub state: TaskState,
    /// The remote job running it (`hearth job logs ID`, `hearth results ID`).
    pub job_id: Option<JobId>,
    /// Why it failed or was skipped.
    pub reason: Option<String>,
    /// When its job was submitted, in Unix milliseconds.
    pub started_at_ms: Option<i64>,
    /// When it ended, in Unix milliseconds.
    pub ended_at_ms: Option<i64>,
}

/// A request package and its progress, as `hearth request status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RequestStatus {
    /// Its id.
    pub id: RequestId,
    /// The package's name, if it has one.
    pub name: Option<String>,
    /// The package file it came from.
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// Where it is.
    pub state: RequestState,
    /// Why it failed or was rolled back.
    pub reason: Option<String>,
    /// How many tasks it has.
    pub tasks: u32,
    /// How many succeeded.
    pub succeeded: u32,
    /// How many failed (skipped ones not counted).
    pub failed: u32,
    /// Each failed task and why.
    pub failures: Vec<String>,
    /// Its resources, in acquisition order.
    pub resources: Vec<Acquisition>,
    /// Its tasks, in file order.
    pub task_list: Vec<TaskStatus>,
    /// Once releasing: the state it ends in.
    pub outcome: Option<RequestState>,
    /// The package as validated.
    #[schema(value_type = Object)]
    pub package: Package,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// Writes a native job spec that runs `/bin/true` on the base image, with `extra` appended.
    fn spec(dir: &Path, file: &str, extra: &str) {
        fs::write(dir.join(file), format!("kind = \"native\"\ncommand = [\"/bin/true\"]\n{extra}")).unwrap();
    }

    /// A `[[tasks]]` table running `spec` on `resource`.
    fn task(resource: &str, spec: &str) -> String {
        format!("[[tasks]]\nresource = \"{resource}\"\nspec = \"{spec}\"\n")
    }

    fn parse(dir: &Path, text: &str) -> Result<Package, PackageError> {
        Package::parse(text, &dir.join("package.toml"), dir)
    }

    /// Every problem of an invalid package, as a user reads it.
    fn problems(dir: &Path, text: &str) -> Vec<String> {
        match parse(dir, text) {
            Err(PackageError::Invalid { problems, .. }) => problems.iter().map(Problem::to_string).collect(),
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    fn demand(cpu_millis: u64, memory_bytes: u64, disk_bytes: u64, gpus: u32) -> Allocation {
        Allocation { cpu_millis, memory_bytes, disk_bytes, gpus, vram_bytes: 0 }
    }

    const EXAMPLE: &str = r#"
name = "train-resnet"

[resources.train]
cpu = 4
memory = "8GiB"
gpus = 2
after = ["prep"]

[resources.prep]
cpu = 2
memory = "2GiB"
disk = "4GiB"
max_price = 2.5
network = true

[[tasks]]
resource = "prep"
spec = "prep.toml"

[[tasks]]
resource = "train"
spec = "train.toml"
"#;

    #[test]
    fn two_gpus_after_a_cpu_machine_load_as_two_waves() {
        let dir = tempfile::tempdir().unwrap();
        spec(dir.path(), "prep.toml", "[resources]\ncpu = 2\n[limits]\nnetwork = true\n");
        spec(dir.path(), "train.toml", "[resources]\ngpus = 2\nmemory = \"8GiB\"\n[limits]\ntime = \"2h\"\n");
        fs::write(dir.path().join("package.toml"), EXAMPLE).unwrap();

        let package = Package::load(&dir.path().join("package.toml")).unwrap();
        assert_eq!(package.name.as_deref(), Some("train-resnet"));
        let [prep, train] = &package.resources[..] else { panic!("{package:?}") };
        assert_eq!((prep.name.as_str(), prep.demand), ("prep", demand(2000, 2 << 30, 4 << 30, 0)));
        assert_eq!((prep.network, prep.max_price_per_hour, prep.time_s), (true, Some(2500), 3600));
        assert_eq!((train.name.as_str(), train.demand), ("train", demand(4000, 8 << 30, 1 << 30, 2)));
        assert_eq!((train.network, train.max_price_per_hour, train.time_s), (false, None, 7200));
        assert_eq!(train.after, ["prep"]);
        assert_eq!(package.waves(), [vec![0], vec![1]]);

        let root = dir.path().canonicalize().unwrap();
        let specs: Vec<_> =
            package.tasks.iter().map(|t| (t.resource.as_str(), t.spec_path.clone())).collect();
        assert_eq!(specs, [("prep", root.join("prep.toml")), ("train", root.join("train.toml"))]);
        assert_eq!(package.tasks_on("train"), [1]);
        assert_eq!(package.tasks_on("gpu"), Vec::<usize>::new());
    }

    #[test]
    fn a_diamond_is_acquired_in_three_waves() {
        let dir = tempfile::tempdir().unwrap();
        spec(dir.path(), "job.toml", "");
        let mut text = String::from(
            "[resources.d]\nafter = [\"b\", \"c\"]\n[resources.c]\nafter = [\"a\"]\n\
             [resources.b]\nafter = [\"a\"]\n[resources.a]\n",
        );
        for resource in ["d", "a", "b", "c", "c"] {
            text += &task(resource, "job.toml");
        }
        let package = parse(dir.path(), &text).unwrap();
        let names = |wave: &Vec<usize>| wave.iter().map(|&i| package.resources[i].name.as_str()).collect();
        let waves: Vec<Vec<&str>> = package.waves().iter().map(names).collect();
        assert_eq!(waves, [vec!["a"], vec!["b", "c"], vec!["d"]]);
        assert_eq!(package.waves().concat(), [0, 1, 2, 3], "resources are stored in acquisition order");
        assert_eq!(package.tasks_on("c"), [3, 4]);
        assert_eq!(package.resources[2].time_s, 7200, "two tasks of the default hour");
    }

    #[test]
    fn omitted_fields_take_their_defaults() {
        let dir = tempfile::tempdir().unwrap();
        spec(dir.path(), "job.toml", "");
        let package = parse(dir.path(), &format!("[resources.only]\n{}", task("only", "job.toml"))).unwrap();
        assert_eq!((package.name, package.retries, package.backoff_ms, package.hold_s), (None, 3, 1000, 600));
        let only = &package.resources[0];
        assert_eq!(only.demand, demand(1000, 256 << 20, 1 << 30, 0));
        assert_eq!((only.network, only.max_price_per_hour), (false, None));
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let dir = tempfile::tempdir().unwrap();
        spec(dir.path(), "job.toml", "");
        spec(dir.path(), "big.toml", "[resources]\ncpu = 4\nmemory = \"4GiB\"\n[limits]\nnetwork = true\n");
        spec(dir.path(), "broken.toml", "[resources]\nmemory = \"x\"\n");
        let text = [
            "[resources.a]\nafter = [\"b\"]\n",
            "[resources.b]\nmemory = \"lots\"\nafter = [\"a\", \"warmup\"]\n",
            "[resources.idle]\n",
            "[resources.small]\nafter = [\"small\"]\n",
            &task("a", "job.toml"),
            &task("b", "job.toml"),
            &task("small", "big.toml"),
            &task("gpu", "broken.toml"),
        ]
        .concat();
        assert_eq!(
            problems(dir.path(), &text),
            [
                r#"`resources.b.memory` is "lots"; expected a size such as "256MiB" or "2GiB""#,
                r#"`resources.b.after` names "warmup", which is not a resource of this package"#,
                "`resources.small.after` names itself; a resource cannot be after itself",
                "`resources` have a dependency cycle: a -> b -> a (each is after the next)",
                r#"`tasks[2]` asks for outbound network; resource "small" has `network = false`"#,
                r#"`tasks[2]` asks for 4 cores; resource "small" holds 1 core"#,
                r#"`tasks[2]` asks for 4GiB of memory; resource "small" holds 256MiB"#,
                r#"`tasks[3].resource` names "gpu", which is not a resource of this package"#,
                r#"`tasks[3].spec` broken.toml: `resources.memory` is "x"; expected a size such as "256MiB" or "2GiB""#,
                "`resources.idle` has no task; a resource no task runs on would be held for nothing",
            ]
        );
    }

    #[test]
    fn cycles_are_named_once_from_their_smallest_member() {
        let dir = tempfile::tempdir().unwrap();
        spec(dir.path(), "job.toml", "");
        let mut text = String::from(
            "[resources.c]\nafter = [\"a\"]\n[resources.b]\nafter = [\"c\"]\n[resources.a]\nafter = [\"b\"]\n",
        );
        for resource in ["a", "b", "c"] {
            text += &task(resource, "job.toml");
        }
        assert_eq!(
            problems(dir.path(), &text),
            ["`resources` have a dependency cycle: a -> b -> c -> a (each is after the next)"]
        );

        // b is in two cycles, each reported once.
        let text = text.replace("after = [\"c\"]", "after = [\"c\", \"d\"]")
            + "[resources.d]\nafter = [\"b\"]\n"
            + &task("d", "job.toml");
        assert_eq!(
            problems(dir.path(), &text),
            [
                "`resources` have a dependency cycle: a -> b -> c -> a (each is after the next)",
                "`resources` have a dependency cycle: b -> d -> b (each is after the next)",
            ]
        );
    }

    #[test]
    fn ranges_names_and_counts_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let text = "retries = 21\nbackoff = \"soon\"\nhold = \"2h\"\n\
                    [resources.\"a b\"]\ncpu = 0\ndisk = \"10KiB\"\ngpus = 65\nmax_price = -1\n";
        assert_eq!(
            problems(dir.path(), text),
            [
                "`retries` is 21; expected at most 20",
                r#"`backoff` is "soon"; expected a duration such as "1s" or "500ms""#,
                r#"`hold` is "2h"; expected from 1s to 1h"#,
                r#"`resources` has a resource named "a b"; expected 1 to 64 letters, digits, '_' or '-'"#,
                "`resources.a b.cpu` is 0; expected a number of cores between 0.001 and 1024",
                r#"`resources.a b.disk` is "10KiB"; expected at least 1MiB"#,
                "`resources.a b.gpus` is 65; expected at most 64 GPUs on one machine",
                "`resources.a b.max_price` is -1; expected credits per hour from 0 to 1000000",
                "`tasks` is empty; expected at least one `[[tasks]]` table",
            ]
        );
        let many: String = (0..33).map(|i| format!("[resources.r{i}]\n")).collect();
        let many = problems(dir.path(), &many);
        assert!(many.contains(&"`resources` has 33 resources; expected at most 32".to_owned()), "{many:?}");
        assert_eq!(
            problems(dir.path(), "backoff = \"5ms\"\n"),
            [
                r#"`backoff` is "5ms"; expected from 10ms to 10m"#,
                "`resources` is empty; expected at least one `[resources.NAME]` table",
                "`tasks` is empty; expected at least one `[[tasks]]` table",
            ]
        );
    }

    #[test]
    fn a_missing_spec_names_the_path_it_tried() {
        let dir = tempfile::tempdir().unwrap();
        let [problem] = &problems(dir.path(), &format!("[resources.a]\n{}", task("a", "gone.toml")))[..]
        else {
            panic!("expected one problem");
        };
        let path = dir.path().join("gone.toml");
        assert!(
            problem.starts_with(&format!("`tasks[0].spec` names {}, which cannot be read:", path.display()))
        );
    }

    #[test]
    fn errors_read_as_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            parse(dir.path(), "retries = 99\n[resources.a]\nmemory = \"lots\"\n").unwrap_err().to_string();
        let path = dir.path().join("package.toml");
        assert!(err.starts_with(&format!("package {}: `retries` is 99", path.display())), "{err}");
        assert!(err.contains("; `resources.a.memory` is \"lots\""), "{err}");
        assert!(!err.contains('\n'), "{err}");

        for text in ["[resources.a]\ncpus = 2\n", "retries = -1\n", "[[tasks]]\nresource = \"a\"\n", "x = ["]
        {
            let err = parse(dir.path(), text).unwrap_err();
            assert!(matches!(err, PackageError::Parse { .. }), "{text:?} gave {err}");
            assert!(!err.to_string().contains('\n'), "{err}");
        }
        let err = Package::load(&dir.path().join("absent.toml")).unwrap_err().to_string();
        assert!(err.starts_with("cannot read package "), "{err}");
    }

    #[test]
    fn packages_are_told_from_job_specs() {
        assert!(is_package(EXAMPLE));
        assert!(is_package(&task("a", "a.toml")));
        assert!(is_package("[resources.a]\ncpu = 2\n"));
        assert!(!is_package("kind = \"native\"\ncommand = [\"/bin/true\"]\n[resources]\ncpu = 2\n"));
        assert!(!is_package("kind = \"native\"\n[resources]\n"));
        assert!(!is_package("this is not [toml"));
        assert!(!is_package(""));
    }
}
