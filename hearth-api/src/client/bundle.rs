//! The client's side of submitting by content: a job spec or a request package read on this
//! machine, every relative path in it resolved here, and the whole sent as one
//! `multipart/form-data` body, so the daemon never reads a path a client named.
//!
//! Each distinct file or folder a spec names is sent once, under `f/N/NAME` in the upload (NAME
//! is its own name, which is how a job sees an input under `/in`); a folder is sent as one part
//! per regular file in it, and a `folder` part for each empty folder. The spec's `module`, `image`
//! and `inputs` are rewritten to those names; a package's task specs are sent as `task-N.toml`,
//! each rewritten the same way, and the package's `tasks[].spec` to those. Symlinks, devices and
//! FIFOs inside a folder are refused here with the path named: only regular files travel.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use reqwest::multipart::{Form, Part};

use crate::package::{Package, PackageError};
use crate::spec::{Image, JobKind, JobSpec, SpecError};
use crate::upload::EXECUTABLE;

/// Why a spec or package could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The spec is not acceptable (checked here first, so the problems name the file).
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The package is not acceptable.
    #[error(transparent)]
    Package(#[from] PackageError),
    /// A file it names cannot be sent as it is.
    #[error("cannot send {}: {why}", .path.display())]
    Unsendable {
        /// The file or folder.
        path: PathBuf,
        /// Why not.
        why: String,
    },
}

/// The files of an upload, and where each goes in it.
#[derive(Debug, Default)]
pub(super) struct Bundle {
    /// Upload name, the file on this machine, its size and whether it is executable, in the
    /// order they are sent.
    files: Vec<(String, PathBuf, u64, bool)>,
    /// Files made here (a package's rewritten task specs): upload name and text.
    texts: Vec<(String, String)>,
    /// Empty folders, by upload name.
    folders: Vec<String>,
    /// The upload name of each file or folder a spec named, by canonical path.
    names: HashMap<PathBuf, String>,
}

impl Bundle {
    /// The spec at `path`, validated, with its paths rewritten to upload names; and its files.
    pub(super) fn job(path: &Path) -> Result<(String, Self), BundleError> {
        let mut bundle = Self::default();
        let text = bundle.spec(path)?;
        Ok((text, bundle))
    }

    /// The package at `path`, validated, with its tasks' specs among the files; and its files.
    pub(super) fn package(path: &Path) -> Result<(String, Self), BundleError> {
        let package = Package::load(path)?;
        let text = read(path)?;
        let mut table: toml::Table = text.parse().map_err(|e| unsendable(path, &e))?;
        let mut bundle = Self::default();
        let mut specs = Vec::new();
        for (i, task) in package.tasks.iter().enumerate() {
            let spec = bundle.spec(&task.spec_path)?;
            let name = format!("task-{i}.toml");
            specs.push((name.clone(), spec));
            if let Some(raw) =
                table.get_mut("tasks").and_then(toml::Value::as_array_mut).and_then(|t| t.get_mut(i))
                && let Some(raw) = raw.as_table_mut()
            {
                raw.insert("spec".into(), toml::Value::String(name));
            }
        }
        bundle.texts = specs;
        let text = toml::to_string(&table).map_err(|e| unsendable(path, &e))?;
        Ok((text, bundle))
    }

    /// The file or folder at `path` as a blob upload: its files (a file at the top under its own
    /// name, a folder's files by their paths in it), its `format` (`raw` or `folder`), and the
    /// folder entries left out because they are not regular files or folders.
    pub(super) fn blob(path: &Path) -> Result<(Self, &'static str, Vec<String>), BundleError> {
        let path = path.canonicalize().map_err(|e| unsendable(path, &e))?;
        let mut bundle = Self::default();
        let meta = std::fs::metadata(&path).map_err(|e| unsendable(&path, &e))?;
        if !meta.is_dir() {
            let own = path.file_name().and_then(|name| name.to_str()).unwrap_or("blob");
            let name = checked(&path, own)?.to_owned();
            bundle.walk(&path, &name)?;
            return Ok((bundle, "raw", Vec::new()));
        }
        let mut skipped = Vec::new();
        bundle.walk_folder(&path, "", &mut skipped)?;
        Ok((bundle, "folder", skipped))
    }

    /// Adds a folder's regular files by their paths under `prefix`, leaving out (and listing)
    /// what is neither a file nor a folder.
    fn walk_folder(
        &mut self,
        dir: &Path,
        prefix: &str,
        skipped: &mut Vec<String>,
    ) -> Result<(), BundleError> {
        let entries = std::fs::read_dir(dir).map_err(|e| unsendable(dir, &e))?;
        for entry in entries {
            let entry = entry.map_err(|e| unsendable(dir, &e))?;
            let path = entry.path();
            let own = entry.file_name();
            let own = own.to_str().ok_or_else(|| unsendable(&path, &"its name is not UTF-8 text"))?;
            let name = if prefix.is_empty() {
                checked(&path, own)?.to_owned()
            } else {
                format!("{prefix}/{}", checked(&path, own)?)
            };
            let meta = std::fs::symlink_metadata(&path).map_err(|e| unsendable(&path, &e))?;
            if meta.is_dir() {
                self.walk_folder(&path, &name, skipped)?;
            } else if meta.is_file() {
                let executable = is_executable(&meta);
                self.files.push((name, path, meta.len(), executable));
            } else {
                skipped.push(name);
            }
        }
        Ok(())
    }

    /// The multipart body: the text as part `entry`, then every folder and file.
    pub(super) async fn form(self, entry: &'static str, text: String) -> Result<Form, BundleError> {
        let mut form = Form::new().text(entry, text);
        for folder in self.folders {
            form = form.text("folder", folder);
        }
        for (name, text) in self.texts {
            form = form.part("file", Part::text(text).file_name(name));
        }
        for (name, path, size, executable) in self.files {
            let file = tokio::fs::File::open(&path).await.map_err(|e| unsendable(&path, &e))?;
            let mut part = Part::stream_with_length(reqwest::Body::from(file), size).file_name(name);
            if executable {
                let mut headers = reqwest::header::HeaderMap::new();
                headers.insert(EXECUTABLE, reqwest::header::HeaderValue::from_static("true"));
                part = part.headers(headers);
            }
            form = form.part("file", part);
        }
        Ok(form)
    }

    /// Validates the spec at `path` and adds its files; its text with the paths rewritten.
    fn spec(&mut self, path: &Path) -> Result<String, BundleError> {
        let spec = JobSpec::load(path)?;
        let text = read(path)?;
        let mut table: toml::Table = text.parse().map_err(|e| unsendable(path, &e))?;
        match &spec.kind {
            JobKind::Wasi { module } => {
                table.insert("module".into(), toml::Value::String(self.add(module)?));
            }
            JobKind::Native { image: Image::Archive(archive), .. } => {
                table.insert("image".into(), toml::Value::String(self.add(archive)?));
            }
            JobKind::Native { image: Image::Base, .. } => {}
        }
        if !spec.inputs.is_empty() {
            let inputs = spec.inputs.iter().map(|input| self.add(input).map(toml::Value::String));
            table.insert("inputs".into(), toml::Value::Array(inputs.collect::<Result<_, _>>()?));
        }
        toml::to_string(&table).map_err(|e| unsendable(path, &e))
    }

    /// Adds the file or folder at `path` (canonical, as a validated spec holds it) once; its
    /// upload name.
    fn add(&mut self, path: &Path) -> Result<String, BundleError> {
        if let Some(name) = self.names.get(path) {
            return Ok(name.clone());
        }
        let own = path
            .file_name()
            .and_then(|name| name.to_str())
            .ok_or_else(|| unsendable(path, &"its name is not UTF-8 text"))?;
        let name = format!("f/{}/{}", self.names.len(), checked(path, own)?);
        self.walk(path, &name)?;
        self.names.insert(path.to_owned(), name.clone());
        Ok(name)
    }

    /// Adds a regular file, or a folder's regular files and empty folders, under `name`.
    fn walk(&mut self, path: &Path, name: &str) -> Result<(), BundleError> {
        let meta = std::fs::symlink_metadata(path).map_err(|e| unsendable(path, &e))?;
        let kind = meta.file_type();
        if kind.is_file() {
            self.files.push((name.to_owned(), path.to_owned(), meta.len(), is_executable(&meta)));
            return Ok(());
        }
        if !kind.is_dir() {
            let what = if kind.is_symlink() { "a symlink" } else { "not a regular file or a folder" };
            return Err(unsendable(path, &format!("it is {what}; only regular files and folders are sent")));
        }
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| unsendable(path, &e))?
            .collect::<Result<_, _>>()
            .map_err(|e| unsendable(path, &e))?;
        if entries.is_empty() {
            self.folders.push(name.to_owned());
        }
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for entry in entries {
            let child = entry.path();
            let own = entry.file_name();
            let own = own.to_str().ok_or_else(|| unsendable(&child, &"its name is not UTF-8 text"))?;
            self.walk(&child, &format!("{name}/{}", checked(&child, own)?))?;
        }
        Ok(())
    }
}

/// Whether a file has an executable bit: it travels with the file (a part header), as a folder
/// blob's manifest keeps it.
fn is_executable(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

/// A file's own name, if the daemon can take it as part of an upload name.
fn checked<'a>(path: &Path, name: &'a str) -> Result<&'a str, BundleError> {
    if name.contains(['\\', '"', '\r', '\n', '\0']) {
        return Err(unsendable(path, &"its name holds a backslash, a quote or a line break"));
    }
    Ok(name)
}

fn read(path: &Path) -> Result<String, BundleError> {
    std::fs::read_to_string(path).map_err(|e| unsendable(path, &e))
}

fn unsendable(path: &Path, why: &dyn std::fmt::Display) -> BundleError {
    BundleError::Unsendable { path: path.to_owned(), why: why.to_string() }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// A working folder: a module, a folder input with a nested file and an empty folder, a file
    /// input, and a spec naming them.
    fn workdir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("m.wasm"), b"\0asm\x01\0\0\0").unwrap();
        fs::create_dir_all(dir.path().join("data/deep")).unwrap();
        fs::create_dir(dir.path().join("data/empty")).unwrap();
        fs::write(dir.path().join("data/deep/a.bin"), b"a").unwrap();
        fs::write(dir.path().join("one.txt"), b"1").unwrap();
        let spec = "kind = \"wasi\"\nmodule = \"m.wasm\"\ninputs = [\"data\", \"one.txt\"]\n";
        fs::write(dir.path().join("job.toml"), spec).unwrap();
        dir
    }

    #[test]
    fn a_spec_is_rewritten_to_the_names_its_files_are_sent_under() {
        let dir = workdir();
        let (text, bundle) = Bundle::job(&dir.path().join("job.toml")).unwrap();
        let table: toml::Table = text.parse().unwrap();
        assert_eq!(table["module"].as_str(), Some("f/0/m.wasm"));
        let inputs: Vec<&str> =
            table["inputs"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
        assert_eq!(inputs, ["f/1/data", "f/2/one.txt"], "each input keeps its own name");
        let names: Vec<&str> = bundle.files.iter().map(|(name, ..)| name.as_str()).collect();
        assert_eq!(names, ["f/0/m.wasm", "f/1/data/deep/a.bin", "f/2/one.txt"]);
        assert_eq!(bundle.folders, ["f/1/data/empty"]);
    }

    #[test]
    fn a_package_sends_each_task_spec_and_each_file_once() {
        let dir = workdir();
        let package = "[resources.a]\n[[tasks]]\nresource = \"a\"\nspec = \"job.toml\"\n\
                       [[tasks]]\nresource = \"a\"\nspec = \"job.toml\"\n";
        fs::write(dir.path().join("p.toml"), package).unwrap();
        let (text, bundle) = Bundle::package(&dir.path().join("p.toml")).unwrap();
        let table: toml::Table = text.parse().unwrap();
        let specs: Vec<&str> =
            table["tasks"].as_array().unwrap().iter().filter_map(|t| t["spec"].as_str()).collect();
        assert_eq!(specs, ["task-0.toml", "task-1.toml"]);
        assert_eq!(bundle.texts.len(), 2);
        assert_eq!(bundle.files.len(), 3, "the shared module and inputs are sent once");
    }

    #[test]
    fn links_and_special_files_in_a_folder_are_refused_by_name() {
        let dir = workdir();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("data/link")).unwrap();
        let error = Bundle::job(&dir.path().join("job.toml")).unwrap_err();
        assert!(
            matches!(&error, BundleError::Unsendable { path, .. } if path.ends_with("data/link")),
            "{error}"
        );
        assert!(error.to_string().contains("symlink"), "{error}");
        // A blob upload leaves them out and says so, as the store's own import does.
        let (bundle, format, skipped) = Bundle::blob(&dir.path().join("data")).unwrap();
        assert_eq!((format, skipped), ("folder", vec!["link".to_owned()]));
        assert_eq!(bundle.files.len(), 1);
    }
}
