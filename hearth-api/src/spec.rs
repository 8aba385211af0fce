//! The job spec: a small TOML file a consumer writes, parsed and validated into a [`JobSpec`].
//!
//! Parsing is two steps, as in ripgrep's flags: the TOML is read into [`RawSpec`], whose types
//! mirror the file (strings for sizes and durations, paths relative to the spec), and then
//! validated into [`JobSpec`], whose types are what a runner needs (bytes, [`Duration`], absolute
//! paths that exist). Validation collects every problem rather than stopping at the first, and each
//! names its field and says what was expected, so a consumer fixes a spec in one go. A spec that
//! fails validation never reaches a runner.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::local_file::{self, FileError};
use crate::toml_file;
use crate::upload::MAX_SPEC_BYTES;

/// The most wall-clock time a job may ask for.
const MAX_TIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// The highest price ceiling a spec may name, in credits per hour.
const MAX_PRICE: f64 = 1_000_000.0;

/// The least memory or disk a job may ask for: less cannot start a process.
const MIN_BYTES: u64 = 1 << 20;

/// Why a spec was refused.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read: missing, not a regular file, or too large.
    #[error(transparent)]
    Read(#[from] FileError),
    /// The TOML does not have the spec's shape; names the field.
    #[error("job spec {}: {message}", local_file::shown(.path))]
    Parse {
        /// The spec file.
        path: PathBuf,
        /// The field and what was expected, on one line.
        message: String,
    },
    /// The values are well-formed but not acceptable.
    #[error("job spec {}: {}", local_file::shown(.path), Problems(.problems))]
    Invalid {
        /// The spec file.
        path: PathBuf,
        /// Every problem found, each naming its field.
        problems: Vec<Problem>,
    },
}

/// One thing wrong with a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The dotted field, such as `resources.memory`.
    pub field: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` {}", self.field, self.message)
    }
}

struct Problems<'a>(&'a [Problem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// A job spec exactly as written in TOML.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpec {
    /// `wasi` or `native`.
    pub kind: Option<String>,
    /// WASI: the module, relative to the spec.
    pub module: Option<PathBuf>,
    /// Native: `base`, or an OCI image archive or rootfs tar relative to the spec.
    pub image: Option<String>,
    /// Native: the program and its arguments; with an image archive, may be left to the image's
    /// `Entrypoint` and `Cmd`.
    pub command: Option<Vec<String>>,
    /// Arguments passed to the job.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment of the job.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Files or folders, relative to the spec, copied read-only under `/in`.
    #[serde(default)]
    pub inputs: Vec<PathBuf>,
    /// What the job needs.
    #[serde(default)]
    pub resources: RawResources,
    /// How long it may run and what it may reach.
    #[serde(default)]
    pub limits: RawLimits,
    /// The most the job may cost on another agent, in credits per hour for its resources.
    pub max_price: Option<f64>,
}

/// `[resources]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawResources {
    /// Cores, possibly fractional.
    pub cpu: f64,
    /// Memory, such as `"256MiB"`.
    pub memory: String,
    /// Scratch disk (`/work` plus `/out`), such as `"1GiB"`.
    pub disk: String,
    /// Whole GPUs.
    pub gpus: u32,
    /// The least memory each GPU must have, such as `"16GiB"`; any GPU when absent.
    pub gpu_memory: Option<String>,
}

impl Default for RawResources {
    fn default() -> Self {
        Self { cpu: 1.0, memory: "256MiB".to_owned(), disk: "1GiB".to_owned(), gpus: 0, gpu_memory: None }
    }
}

/// `[limits]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawLimits {
    /// Wall-clock limit, such as `"60s"`.
    pub time: String,
    /// Whether the job may open outbound connections.
    pub network: bool,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self { time: "1h".to_owned(), network: false }
    }
}

/// A validated job spec, ready for a runner.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// What runs.
    pub kind: JobKind,
    /// Arguments passed to the job.
    pub args: Vec<String>,
    /// Environment of the job.
    pub env: BTreeMap<String, String>,
    /// Absolute paths of the inputs; each appears as `/in/<file name>`.
    pub inputs: Vec<PathBuf>,
    /// What the job needs.
    pub resources: Demand,
    /// How long it may run and what it may reach.
    pub limits: Limits,
    /// The most it may cost on another agent, in thousandths of a credit per hour; any price
    /// when absent.
    pub max_price_per_hour: Option<u64>,
}

/// What runs, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKind {
    /// A WebAssembly module for WASI preview 1.
    Wasi {
        /// Absolute path of the module.
        module: PathBuf,
    },
    /// A Linux program in a namespace sandbox.
    Native {
        /// Its root filesystem.
        image: Image,
        /// The program and its arguments; `None` (only with an image archive) runs the image's
        /// `Entrypoint` and `Cmd`.
        command: Option<Vec<String>>,
    },
}

/// Where a native job's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    /// The provider's own system, read-only (`/usr`, `/bin`, `/lib`), nothing else of the host.
    Base,
    /// An OCI image archive or a plain rootfs tar (absolute path).
    Archive(PathBuf),
}

/// The resources a job asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    /// Thousandths of a core.
    pub cpu_millis: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Scratch disk in bytes.
    pub disk_bytes: u64,
    /// Whole GPUs.
    pub gpus: u32,
    /// The least memory each GPU must have, in bytes; 0 for any GPU.
    pub gpu_memory_bytes: u64,
}

/// What bounds a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock deadline from start.
    pub time: Duration,
    /// Outbound network granted.
    pub network: bool,
}

impl JobSpec {
    /// Reads and validates the spec at `path`; relative paths in it are relative to its folder.
    pub fn load(path: &Path) -> Result<Self, SpecError> {
        let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Self::load_in(path, base)
    }

    /// Reads and validates the spec at `path`; relative paths in it are relative to `base` (an
    /// upload's staged spec lies beside the folder of its files, not in it).
    pub fn load_in(path: &Path, base: &Path) -> Result<Self, SpecError> {
        let text = local_file::read_text(path, MAX_SPEC_BYTES as u64, "job spec")?;
        Self::parse(&text, path, base)
    }

    /// Parses and validates spec text; `path` names it in errors, `base` resolves relative paths.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Self, SpecError> {
        let raw: RawSpec =
            toml_file::parse(text).map_err(|message| SpecError::Parse { path: path.to_owned(), message })?;
        raw.validate(base).map_err(|problems| SpecError::Invalid { path: path.to_owned(), problems })
    }
}

impl RawSpec {
    /// Validates every field, resolving paths against `base`; returns every problem found.
    pub fn validate(self, base: &Path) -> Result<JobSpec, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut problem = |field: &str, message: String| {
            problems.push(Problem { field: field.to_owned(), message });
        };
        let existing = |field: &str, relative: &Path, problem: &mut dyn FnMut(&str, String)| {
            let resolved = base.join(relative);
            match resolved.canonicalize() {
                Ok(absolute) => Some(absolute),
                Err(e) => {
                    problem(
                        field,
                        format!("names {}, which cannot be opened: {e}", local_file::shown(&resolved)),
                    );
                    None
                }
            }
        };

        let kind = match self.kind.as_deref() {
            Some("wasi") => {
                if self.image.is_some() {
                    problem("image", "is only for native jobs; a WASI job names its `module`".into());
                }
                if self.command.is_some() {
                    problem(
                        "command",
                        "is only for native jobs; pass a WASI job's arguments in `args`".into(),
                    );
                }
                if self.limits.network {
                    problem(
                        "limits.network",
                        "is only for native jobs; WASI preview 1 modules have no sockets".into(),
                    );
                }
                match &self.module {
                    Some(module) => {
                        existing("module", module, &mut problem).map(|module| JobKind::Wasi { module })
                    }
                    None => {
                        problem("module", "is missing; expected the path of a .wasm file".into());
                        None
                    }
                }
            }
            Some("native") => {
                if self.module.is_some() {
                    problem("module", "is only for WASI jobs; a native job names its `image`".into());
                }
                let archive = self.image.as_deref().filter(|image| *image != "base");
                let image = match archive {
                    None => Some(Image::Base),
                    Some(archive) => existing("image", Path::new(archive), &mut problem).map(Image::Archive),
                };
                let command = match self.command {
                    Some(command) if command.first().is_some_and(|program| !program.is_empty()) => {
                        Some(Some(command))
                    }
                    Some(_) => {
                        problem("command", "is empty; expected the program and its arguments".into());
                        None
                    }
                    // An image archive's config may say what to run.
                    None if archive.is_some() => Some(None),
                    None => {
                        problem(
                            "command",
                            "is missing; expected a list such as [\"/bin/sh\", \"-c\", \"…\"] (only an \
                             image archive may leave it to the image's Entrypoint and Cmd)"
                                .into(),
                        );
                        None
                    }
                };
                image.zip(command).map(|(image, command)| JobKind::Native { image, command })
            }
            Some(other) => {
                problem("kind", format!("is {other:?}; expected \"wasi\" or \"native\""));
                None
            }
            None => {
                problem("kind", "is missing; expected \"wasi\" or \"native\"".into());
                None
            }
        };

        for (name, value) in &self.env {
            if name.is_empty() || name.contains(['=', '\0']) {
                problem(&format!("env.{name}"), "is not a valid variable name (no '=' or NUL)".into());
            }
            if value.contains('\0') {
                problem(&format!("env.{name}"), "contains a NUL byte".into());
            }
        }
        for (i, arg) in self.args.iter().enumerate() {
            if arg.contains('\0') {
                problem(&format!("args[{i}]"), "contains a NUL byte".into());
            }
        }

        let mut inputs = Vec::new();
        let mut names = BTreeSet::new();
        for (i, input) in self.inputs.iter().enumerate() {
            let field = format!("inputs[{i}]");
            let Some(absolute) = existing(&field, input, &mut problem) else { continue };
            match absolute.file_name() {
                Some(name) if names.insert(name.to_owned()) => inputs.push(absolute),
                Some(name) => problem(
                    &field,
                    format!(
                        "would also appear as /in/{}; give inputs distinct names",
                        name.to_string_lossy()
                    ),
                ),
                None => problem(&field, "has no file name to appear under /in".into()),
            }
        }

        let cpu = self.resources.cpu;
        let cpu_millis = if (0.001..=1024.0).contains(&cpu) {
            Some((cpu * 1000.0).round() as u32)
        } else {
            problem("resources.cpu", format!("is {cpu}; expected a number of cores between 0.001 and 1024"));
            None
        };
        let mut size = |field: &str, text: &str| match text.trim().parse::<bytesize::ByteSize>() {
            Ok(size) if size.as_u64() >= MIN_BYTES => Some(size.as_u64()),
            Ok(_) => {
                problem(field, format!("is {text:?}; expected at least 1MiB"));
                None
            }
            Err(_) => {
                problem(field, format!("is {text:?}; expected a size such as \"256MiB\" or \"2GiB\""));
                None
            }
        };
        let memory_bytes = size("resources.memory", &self.resources.memory);
        let disk_bytes = size("resources.disk", &self.resources.disk);
        let gpu_memory_bytes = match &self.resources.gpu_memory {
            Some(_) if self.resources.gpus == 0 => {
                problem("resources.gpu_memory", "is set, but the job asks for no GPUs".into());
                None
            }
            Some(text) => size("resources.gpu_memory", text),
            None => Some(0),
        };
        let time = match humantime::parse_duration(self.limits.time.trim()) {
            Ok(time) if !time.is_zero() && time <= MAX_TIME => Some(time),
            Ok(_) => {
                problem(
                    "limits.time",
                    format!("is {:?}; expected more than 0 and at most 7 days", self.limits.time),
                );
                None
            }
            Err(_) => {
                problem(
                    "limits.time",
                    format!("is {:?}; expected a duration such as \"60s\" or \"2h\"", self.limits.time),
                );
                None
            }
        };

        let max_price_per_hour = match self.max_price {
            Some(price) if price.is_finite() && (0.0..=MAX_PRICE).contains(&price) => {
                Some((price * 1000.0).round() as u64)
            }
            Some(price) => {
                problem("max_price", format!("is {price}; expected credits per hour from 0 to {MAX_PRICE}"));
                None
            }
            None => None,
        };

        match (kind, cpu_millis, memory_bytes, disk_bytes, gpu_memory_bytes, time) {
            (
                Some(kind),
                Some(cpu_millis),
                Some(memory_bytes),
                Some(disk_bytes),
                Some(gpu_memory_bytes),
                Some(time),
            ) if problems.is_empty() => Ok(JobSpec {
                kind,
                args: self.args,
                env: self.env,
                inputs,
                resources: Demand {
                    cpu_millis,
                    memory_bytes,
                    disk_bytes,
                    gpus: self.resources.gpus,
                    gpu_memory_bytes,
                },
                limits: Limits { time, network: self.limits.network },
                max_price_per_hour,
            }),
            _ => Err(problems),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// A folder holding a module, an archive and two inputs, for specs to refer to.
    fn workspace() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("hello.wasm"), b"\0asm\x01\0\0\0").unwrap();
        fs::write(dir.path().join("rootfs.tar"), b"").unwrap();
        fs::write(dir.path().join("data.txt"), b"data").unwrap();
        fs::create_dir(dir.path().join("more")).unwrap();
        fs::write(dir.path().join("more").join("data.txt"), b"other").unwrap();
        dir
    }

    fn parse(dir: &Path, text: &str) -> Result<JobSpec, SpecError> {
        JobSpec::parse(text, &dir.join("job.toml"), dir)
    }

    const ISSUE_EXAMPLE: &str = r#"
kind = "wasi"
module = "hello.wasm"
args = ["a", "b"]
env = { KEY = "value" }
inputs = ["data.txt"]
[resources]
cpu = 1.0
memory = "256MiB"
disk = "1GiB"
gpus = 0
[limits]
time = "60s"
network = false
"#;

    #[test]
    fn the_documented_minimum_is_accepted_as_written() {
        let dir = workspace();
        let spec = parse(dir.path(), ISSUE_EXAMPLE).unwrap();
        let root = dir.path().canonicalize().unwrap();
        assert_eq!(spec.kind, JobKind::Wasi { module: root.join("hello.wasm") });
        assert_eq!(spec.args, ["a", "b"]);
        assert_eq!(spec.env.get("KEY").map(String::as_str), Some("value"));
        assert_eq!(spec.inputs, [root.join("data.txt")]);
        assert_eq!(
            spec.resources,
            Demand {
                cpu_millis: 1000,
                memory_bytes: 256 << 20,
                disk_bytes: 1 << 30,
                gpus: 0,
                gpu_memory_bytes: 0
            }
        );
        assert_eq!(spec.limits, Limits { time: Duration::from_secs(60), network: false });
    }

    #[test]
    fn native_jobs_default_to_the_base_image() {
        let dir = workspace();
        let spec =
            parse(dir.path(), "kind = \"native\"\ncommand = [\"/bin/sh\", \"-c\", \"echo hi > /out/x\"]\n")
                .unwrap();
        assert!(matches!(spec.kind, JobKind::Native { image: Image::Base, .. }));
        let spec =
            parse(dir.path(), "kind = \"native\"\nimage = \"rootfs.tar\"\ncommand = [\"/bin/true\"]\n")
                .unwrap();
        let archive = dir.path().canonicalize().unwrap().join("rootfs.tar");
        assert!(matches!(spec.kind, JobKind::Native { image: Image::Archive(ref p), .. } if *p == archive));
        // An image archive may leave the command to the image's config; the base image may not.
        let spec = parse(dir.path(), "kind = \"native\"\nimage = \"rootfs.tar\"\n").unwrap();
        assert!(matches!(spec.kind, JobKind::Native { command: None, .. }));
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let dir = workspace();
        let text = r#"
kind = "wasi"
module = "missing.wasm"
command = ["/bin/true"]
inputs = ["data.txt", "more/data.txt", "nope.txt"]
env = { "A=B" = "x" }
[resources]
cpu = 0
memory = "lots"
disk = "10KiB"
gpu_memory = "16GiB"
[limits]
time = "0s"
"#;
        let SpecError::Invalid { problems, .. } = parse(dir.path(), text).unwrap_err() else {
            panic!("expected validation problems");
        };
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "command",
                "module",
                "env.A=B",
                "inputs[1]",
                "inputs[2]",
                "resources.cpu",
                "resources.memory",
                "resources.disk",
                "resources.gpu_memory",
                "limits.time"
            ],
            "{problems:?}"
        );
    }

    #[test]
    fn shape_errors_name_the_field_on_one_line() {
        let dir = workspace();
        let cases = [
            ("kind = \"wasi\"\nmodule = \"hello.wasm\"\n[resources]\ngpus = -1\n", "resources.gpus"),
            ("kind = \"wasi\"\nmodule = \"hello.wasm\"\nargs = \"a b\"\n", "args"),
            ("kind = \"wasi\"\nmodule = \"hello.wasm\"\n[limits]\nnetwork = \"yes\"\n", "limits.network"),
            ("kind = \"wasi\"\nmodlue = \"hello.wasm\"\n", "modlue"),
            ("kind = \"wasi\"\nmodule = \"hello.wasm\"\n[resources]\ncpus = 2\n", "cpus"),
            ("kind = [\n", "job.toml"),
        ];
        for (text, field) in cases {
            let err = parse(dir.path(), text).unwrap_err().to_string();
            assert!(err.contains(field), "{text:?} gave {err:?}");
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }

    #[test]
    fn kinds_and_their_fields_must_match() {
        let dir = workspace();
        let table = [
            ("", "kind"),
            ("kind = \"docker\"\n", "kind"),
            ("kind = \"wasi\"\n", "module"),
            ("kind = \"native\"\n", "command"),
            ("kind = \"native\"\ncommand = []\n", "command"),
            ("kind = \"native\"\nmodule = \"hello.wasm\"\ncommand = [\"/bin/true\"]\n", "module"),
            ("kind = \"wasi\"\nmodule = \"hello.wasm\"\nimage = \"base\"\n", "image"),
            ("kind = \"wasi\"\nmodule = \"hello.wasm\"\n[limits]\nnetwork = true\n", "limits.network"),
            ("kind = \"native\"\nimage = \"gone.tar\"\ncommand = [\"/bin/true\"]\n", "image"),
        ];
        for (text, field) in table {
            match parse(dir.path(), text) {
                Err(SpecError::Invalid { problems, .. }) => {
                    assert!(problems.iter().any(|p| p.field == field), "{text:?}: {problems:?}")
                }
                other => panic!("{text:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn sizes_and_durations_accept_the_usual_units() {
        let dir = workspace();
        for (memory, bytes) in
            [("1MiB", 1 << 20), ("1.5GiB", 3 << 29), ("2GB", 2_000_000_000), ("512 MiB", 512 << 20)]
        {
            let text =
                format!("kind = \"wasi\"\nmodule = \"hello.wasm\"\n[resources]\nmemory = \"{memory}\"\n");
            assert_eq!(parse(dir.path(), &text).unwrap().resources.memory_bytes, bytes, "{memory}");
        }
        for (time, secs) in [("90s", 90), ("2h", 7200), ("1h 30m", 5400)] {
            let text = format!("kind = \"wasi\"\nmodule = \"hello.wasm\"\n[limits]\ntime = \"{time}\"\n");
            assert_eq!(parse(dir.path(), &text).unwrap().limits.time, Duration::from_secs(secs), "{time}");
        }
    }

    #[test]
    fn load_resolves_paths_next_to_the_spec_file() {
        let dir = workspace();
        let spec_path = dir.path().join("job.toml");
        fs::write(&spec_path, ISSUE_EXAMPLE).unwrap();
        let spec = JobSpec::load(&spec_path).unwrap();
        assert_eq!(spec.inputs, [dir.path().canonicalize().unwrap().join("data.txt")]);
        let err = JobSpec::load(&dir.path().join("absent.toml")).unwrap_err();
        assert!(matches!(err, SpecError::Read(_)), "{err}");
    }
}
