//! What an image's config says about running it (`Env`, `WorkingDir`, `Entrypoint`, `Cmd`), and the
//! one rule that merges it with the job spec: the spec wins wherever it says something.
//!
//! Pure values and functions: reading the config's JSON, checking it, and [`ImageConfig::launch`].
//! The unpacker stores an [`ImageConfig`] beside each cached image; the runner asks it how to start
//! the job.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// The folder a job starts in unless its image's command runs with a `WorkingDir` of its own.
pub const DEFAULT_WORKDIR: &str = "/work";

/// The parts of an OCI or Docker image config a job's start uses. `User`, `ExposedPorts`,
/// `Volumes` and the rest are not read: the sandbox decides the job's user, network and folders.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `Env`, as name and value.
    pub env: BTreeMap<String, String>,
    /// `WorkingDir`, an absolute path inside the image.
    pub working_dir: Option<String>,
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
}

/// How a native job starts, once its spec and its image's config are merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The program and its arguments.
    pub command: Vec<String>,
    /// The environment, besides what the sandbox and the grants add.
    pub env: BTreeMap<String, String>,
    /// The folder the command starts in.
    pub workdir: PathBuf,
}

/// The config document as `docker save` and OCI layouts write it.
#[derive(Deserialize)]
struct Document {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    config: Option<Settings>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Deserialize)]
struct Settings {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// A parsed image config: the settings a job uses, and the digests of the uncompressed layers
/// (`rootfs.diff_ids`) a `docker save` archive's layers are checked against.
pub(super) struct Parsed {
    pub(super) config: ImageConfig,
    pub(super) diff_ids: Vec<String>,
}

impl ImageConfig {
    /// Reads an image config document, refusing one made for another system than this one and
    /// values a process cannot be given (a NUL byte, a relative `WorkingDir`).
    pub(super) fn parse(json: &[u8]) -> anyhow::Result<Parsed> {
        let document: Document = serde_json::from_slice(json).context("parsing the image config")?;
        if let Some(os) = document.os.as_deref().filter(|os| *os != "linux") {
            bail!("the image is for {os}, not linux");
        }
        let arch = this_architecture();
        if let Some(other) = document.architecture.as_deref().filter(|a| *a != arch) {
            bail!("the image is for {other}; this machine is {arch}");
        }
        let settings =
            document.config.unwrap_or(Settings { env: None, working_dir: None, entrypoint: None, cmd: None });
        let no_nul = |what: &str, values: &[String]| -> anyhow::Result<()> {
            if values.iter().any(|value| value.contains('\0')) {
                bail!("the image config's {what} contains a NUL byte");
            }
            Ok(())
        };
        let env_list = settings.env.unwrap_or_default();
        no_nul("Env", &env_list)?;
        // `NAME` alone means "inherit from the caller" in Docker; a job inherits nothing.
        let env = env_list
            .iter()
            .filter_map(|pair| pair.split_once('='))
            .filter(|(name, _)| !name.is_empty())
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect();
        let entrypoint = settings.entrypoint.unwrap_or_default();
        no_nul("Entrypoint", &entrypoint)?;
        let cmd = settings.cmd.unwrap_or_default();
        no_nul("Cmd", &cmd)?;
        let working_dir = settings.working_dir.filter(|dir| !dir.is_empty());
        if let Some(dir) = &working_dir {
            no_nul("WorkingDir", std::slice::from_ref(dir))?;
            if !dir.starts_with('/') {
                bail!("the image config's WorkingDir {dir:?} is not an absolute path");
            }
        }
        Ok(Parsed {
            config: ImageConfig { env, working_dir, entrypoint, cmd },
            diff_ids: document.rootfs.map(|rootfs| rootfs.diff_ids).unwrap_or_default(),
        })
    }

    /// Merges the spec with this config. The spec's `env` is laid over the image's `Env` (a name
    /// both set takes the spec's value). A spec's `command` runs as written, followed by its
    /// `args`, in [`DEFAULT_WORKDIR`]; the image's `Entrypoint`, `Cmd` and `WorkingDir` are then not
    /// used. Without one, the image's `Entrypoint` runs, followed by the spec's `args` when there
    /// are any and by the image's `Cmd` otherwise (as `docker run IMAGE ARGS…` does), in the
    /// image's `WorkingDir` (or [`DEFAULT_WORKDIR`]).
    pub fn launch(
        &self,
        command: Option<&[String]>,
        args: &[String],
        env: &BTreeMap<String, String>,
    ) -> anyhow::Result<Launch> {
        let mut merged = self.env.clone();
        merged.extend(env.iter().map(|(name, value)| (name.clone(), value.clone())));
        let (command, workdir) = match command {
            Some(command) => {
                let mut command = command.to_vec();
                command.extend(args.iter().cloned());
                (command, DEFAULT_WORKDIR)
            }
            None => {
                let mut command = self.entrypoint.clone();
                command.extend(if args.is_empty() { &self.cmd } else { args }.iter().cloned());
                if command.first().is_none_or(String::is_empty) {
                    bail!("the spec sets no `command` and the image has no Entrypoint or Cmd to run");
                }
                (command, self.working_dir.as_deref().unwrap_or(DEFAULT_WORKDIR))
            }
        };
        Ok(Launch { command, env: merged, workdir: PathBuf::from(workdir) })
    }
}

/// This machine's architecture in the words of OCI platforms.
pub(super) fn this_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| (*v).to_owned()).collect()
    }

    #[test]
    fn the_spec_wins_wherever_it_says_something() {
        let image = ImageConfig {
            env: [
                ("PATH".to_owned(), "/opt/conda/bin:/usr/bin".to_owned()),
                ("A".to_owned(), "image".to_owned()),
            ]
            .into(),
            working_dir: Some("/workspace".to_owned()),
            entrypoint: strings(&["/entry"]),
            cmd: strings(&["default"]),
        };
        let spec_env: BTreeMap<String, String> = [("A".to_owned(), "spec".to_owned())].into();
        let own = strings(&["python", "/in/train.py"]);
        // (spec command, spec args, command run, folder)
        let table = [
            (Some(own.as_slice()), vec![], strings(&["python", "/in/train.py"]), "/work"),
            (
                Some(own.as_slice()),
                strings(&["--epochs", "1"]),
                strings(&["python", "/in/train.py", "--epochs", "1"]),
                "/work",
            ),
            (None, vec![], strings(&["/entry", "default"]), "/workspace"),
            (None, strings(&["other"]), strings(&["/entry", "other"]), "/workspace"),
        ];
        for (command, args, expected, folder) in table {
            let launch = image.launch(command, &args, &spec_env).expect("launch");
            assert_eq!(launch.command, expected, "{command:?} {args:?}");
            assert_eq!(launch.workdir, PathBuf::from(folder), "{command:?} {args:?}");
            assert_eq!(launch.env["A"], "spec");
            assert_eq!(launch.env["PATH"], "/opt/conda/bin:/usr/bin");
        }
    }

    #[test]
    fn an_image_without_a_program_needs_a_command() {
        let bare = ImageConfig::default();
        let error = bare.launch(None, &[], &BTreeMap::new()).expect_err("nothing to run");
        assert!(error.to_string().contains("no Entrypoint or Cmd"), "{error}");
        // Arguments alone are the program, as with `docker run IMAGE ARGS…`.
        let launch = bare.launch(None, &strings(&["/bin/true"]), &BTreeMap::new()).expect("args");
        assert_eq!(launch.command, ["/bin/true"]);
        assert_eq!(launch.workdir, PathBuf::from("/work"));
    }

    #[test]
    fn configs_are_read_and_checked() {
        let arch = this_architecture();
        let good = format!(
            r#"{{"architecture":"{arch}","os":"linux","config":{{"Env":["PATH=/usr/bin","X=a=b","INHERIT"],
               "WorkingDir":"/app","Entrypoint":null,"Cmd":["sh"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:00"]}}}}"#
        );
        let parsed = ImageConfig::parse(good.as_bytes()).expect("good");
        assert_eq!(parsed.config.env.len(), 2);
        assert_eq!(parsed.config.env["X"], "a=b");
        assert_eq!(parsed.config.working_dir.as_deref(), Some("/app"));
        assert!(parsed.config.entrypoint.is_empty());
        assert_eq!(parsed.config.cmd, ["sh"]);
        assert_eq!(parsed.diff_ids, ["sha256:00"]);
        assert_eq!(ImageConfig::parse(b"{}").expect("empty").config, ImageConfig::default());
        for (bad, says) in [
            (r#"{"os":"windows"}"#.to_owned(), "for windows"),
            (r#"{"architecture":"s390x-not-this"}"#.to_owned(), "this machine is"),
            (r#"{"config":{"WorkingDir":"app"}}"#.to_owned(), "not an absolute path"),
            (r#"{"config":{"Env":["A=\u0000"]}}"#.to_owned(), "NUL"),
            (r#"{"config":{"Cmd":"sh"}}"#.to_owned(), "parsing"),
        ] {
            let error =
                ImageConfig::parse(bad.as_bytes()).err().map(|e| format!("{e:#}")).unwrap_or_default();
            assert!(error.contains(says), "{bad}: {error:?}");
        }
    }
}
