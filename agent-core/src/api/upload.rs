//! Receiving a job spec or a request package by content: one `multipart/form-data` body streamed
//! into a fresh staging folder ([`crate::uploads`]), checked part by part.
//!
//! The body has one text part with the spec (`spec`) or the package (`package`), its paths
//! relative to a virtual upload root, and one `file` part per file, whose file name is its path
//! under that root; a `folder` part (text: a path) makes an empty folder. Everything a client sends
//! is hostile: a name that is absolute, holds `..`, `.`, a NUL or a backslash, repeats another, or
//! exceeds the limits (part count, one file's size, the whole upload's size, the spec's size) is
//! refused, and so is a spec or package naming a path that was not uploaded. A refused upload's
//! folder is removed by its [`Staged`] guard, so nothing is left and no state changes.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use axum::extract::Multipart;
use axum::extract::multipart::{Field, MultipartRejection};
use axum::http::StatusCode;
use tokio::io::AsyncWriteExt;

use super::error::ApiError;
use crate::config::ApiConfig;
use crate::jobs::spec::RawSpec;
use crate::uploads::{Staged, Uploads};
pub use hearth_api::upload::{EXECUTABLE, MAX_SPEC_BYTES, PackageUpload, SpecUpload};

/// The longest name of an uploaded file or folder, in bytes.
const MAX_NAME_BYTES: usize = 1024;

/// How deep an uploaded name may go.
const MAX_DEPTH: usize = 32;

/// What one upload may hold; from `[api]` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadLimits {
    /// The most `file` and `folder` parts.
    pub max_files: usize,
    /// The largest single file, in bytes.
    pub max_file_bytes: u64,
    /// The largest sum of all files, in bytes.
    pub max_total_bytes: u64,
}

impl From<&ApiConfig> for UploadLimits {
    fn from(config: &ApiConfig) -> Self {
        Self {
            max_files: config.upload_max_files,
            max_file_bytes: config.upload_max_file_bytes,
            max_total_bytes: config.upload_max_bytes,
        }
    }
}

/// Which text part an upload carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Entry {
    /// A job spec (`spec`).
    Spec,
    /// A request package (`package`), whose task specs are among the files.
    Package,
    /// Files to keep as a blob, with `format` and `share_with` text parts.
    Blob,
}

impl Entry {
    fn field(self) -> &'static str {
        match self {
            Self::Spec => "spec",
            Self::Package => "package",
            Self::Blob => "format",
        }
    }

    /// Whether a text part of this name belongs to this kind of upload.
    fn takes(self, name: &str) -> bool {
        name == self.field() || (self == Self::Blob && name == "share_with")
    }
}

/// The most text parts of a blob upload (its peers to share with, and its format).
const MAX_BLOB_TEXTS: usize = 256;

/// What [`receive`] staged.
#[derive(Debug)]
pub(super) struct Received {
    /// The staging folder, the spec or package (if any) written to [`Staged::spec`].
    pub(super) staged: Staged,
    /// A blob upload's text parts, by name, in order.
    pub(super) texts: Vec<(String, String)>,
}

/// Streams `multipart` into a fresh staging folder and checks that every path the spec (or the
/// package and each of its task specs) names was uploaded. Answers the staging folder, its spec
/// written to [`Staged::spec`].
pub(super) async fn receive(
    uploads: &Uploads,
    limits: UploadLimits,
    entry: Entry,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Received, ApiError> {
    // Refused before anything is staged, with the API's own error body.
    let mut multipart = multipart.map_err(|rejection| {
        ApiError::bad_request(
            "invalid_upload",
            &format!("the body must be multipart/form-data: {}", rejection.body_text()),
        )
    })?;
    let staged = uploads.create().map_err(|error| {
        ApiError::internal("upload_failed", &format!("cannot make a staging folder: {error}"))
    })?;
    let mut names = BTreeSet::new();
    let mut folders = BTreeSet::new();
    let mut spec: Option<String> = None;
    let mut texts = Vec::new();
    let mut total: u64 = 0;
    while let Some(field) = multipart.next_field().await.map_err(bad_body)? {
        let kind = field.name().unwrap_or_default().to_owned();
        match kind.as_str() {
            "file" | "folder" => {
                if names.len() + folders.len() >= limits.max_files {
                    return Err(too_large(format!(
                        "the upload has more than {} files and folders (the `upload_max_files` limit)",
                        limits.max_files
                    )));
                }
            }
            name if entry.takes(name) => {}
            other => {
                let texts = if entry == Entry::Blob { "`format`, `share_with`" } else { entry.field() };
                return Err(ApiError::bad_request(
                    "invalid_upload",
                    &format!("has a part named {other:?}; expected {texts}, `file` and `folder` parts"),
                ));
            }
        }
        match kind.as_str() {
            "file" => {
                let name = field.file_name().map(str::to_owned).unwrap_or_default();
                let relative = safe_name(&name)?;
                if names.contains(&name) || folders.contains(&name) {
                    return Err(duplicate(&name));
                }
                total = write_file(&staged, &relative, &name, field, limits, total).await?;
                names.insert(name);
            }
            "folder" => {
                let name = read_text(field, MAX_NAME_BYTES, "folder").await?;
                let relative = safe_name(&name)?;
                if names.contains(&name) || !folders.insert(name.clone()) {
                    return Err(duplicate(&name));
                }
                tokio::fs::create_dir_all(staged.files().join(&relative))
                    .await
                    .map_err(|error| clash(&name, &error))?;
            }
            _ if entry == Entry::Blob => {
                if texts.len() >= MAX_BLOB_TEXTS {
                    return Err(too_large(format!("the upload has more than {MAX_BLOB_TEXTS} text parts")));
                }
                let text = read_text(field, MAX_NAME_BYTES, &kind).await?;
                texts.push((kind, text));
            }
            _ => {
                if spec.is_some() {
                    return Err(ApiError::bad_request(
                        "invalid_upload",
                        &format!("has two `{}` parts; send one", entry.field()),
                    ));
                }
                spec = Some(read_text(field, MAX_SPEC_BYTES, entry.field()).await?);
            }
        }
    }
    if entry == Entry::Blob {
        return Ok(Received { staged, texts });
    }
    let Some(text) = spec else {
        return Err(ApiError::bad_request(
            "invalid_upload",
            &format!("has no `{}` part; send the text as a part of that name", entry.field()),
        ));
    };
    let uploaded = Uploaded { files: &names, folders: &folders };
    match entry {
        Entry::Spec => uploaded.check_spec(&text, Path::new(""), "")?,
        Entry::Blob => {}
        Entry::Package => {
            for (i, task) in task_specs(&text).into_iter().enumerate() {
                let Some(task) = task else { continue };
                let field = format!("tasks[{i}].spec");
                let at = uploaded.resolve(Path::new(""), &task, &field)?;
                if !names.contains(&at) {
                    return Err(missing(&field, &task));
                }
                let text = read_task_spec(&staged.files().join(&at), &field).await?;
                let folder = Path::new(&at).parent().unwrap_or(Path::new("")).to_owned();
                uploaded.check_spec(&text, &folder, &format!("{at}: "))?;
            }
        }
    }
    tokio::fs::write(staged.spec(), text).await.map_err(|error| {
        ApiError::internal("upload_failed", &format!("cannot stage the {}: {error}", entry.field()))
    })?;
    Ok(Received { staged, texts })
}

/// The names that were uploaded, to check what a spec or package names against.
struct Uploaded<'a> {
    files: &'a BTreeSet<String>,
    folders: &'a BTreeSet<String>,
}

impl Uploaded<'_> {
    /// Checks that every path the spec names (relative to `folder` under the upload root) was
    /// uploaded, as a file or a folder. A spec that does not parse is left to the spec's own
    /// validation, which names what is wrong.
    fn check_spec(&self, text: &str, folder: &Path, prefix: &str) -> Result<(), ApiError> {
        let Ok(raw) = hearth_api::toml_file::parse::<RawSpec>(text) else { return Ok(()) };
        let mut named: Vec<(String, PathBuf)> = Vec::new();
        if let Some(module) = raw.module {
            named.push(("module".into(), module));
        }
        if let Some(image) = raw.image.filter(|image| image != "base") {
            named.push(("image".into(), PathBuf::from(image)));
        }
        for (i, input) in raw.inputs.into_iter().enumerate() {
            named.push((format!("inputs[{i}]"), input));
        }
        for (field, path) in named {
            let field = format!("{prefix}{field}");
            let display = path.to_string_lossy().into_owned();
            let at = self.resolve(folder, &display, &field)?;
            let is_folder = self.folders.contains(&at)
                || self
                    .files
                    .iter()
                    .chain(self.folders)
                    .any(|name| name.strip_prefix(at.as_str()).is_some_and(|rest| rest.starts_with('/')));
            if !self.files.contains(&at) && !is_folder {
                return Err(missing(&field, &display));
            }
        }
        Ok(())
    }

    /// `relative` resolved against `folder` inside the upload root, as an upload name; refused
    /// when absolute or when it climbs out of the root.
    fn resolve(&self, folder: &Path, relative: &str, field: &str) -> Result<String, ApiError> {
        let outside = || {
            ApiError::bad_request(
                "invalid_upload",
                &format!(
                    "`{field}` names {relative:?}, which is outside the upload; name uploaded files by their relative path"
                ),
            )
        };
        let mut parts: Vec<String> =
            folder.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
        for component in Path::new(relative).components() {
            match component {
                Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
                Component::CurDir => {}
                Component::ParentDir => {
                    parts.pop().ok_or_else(outside)?;
                }
                Component::RootDir | Component::Prefix(_) => return Err(outside()),
            }
        }
        if parts.is_empty() {
            return Err(outside());
        }
        Ok(parts.join("/"))
    }
}

/// The `spec` of each `[[tasks]]` table of package text, where it is a string; a package that does
/// not parse is left to the package's own validation.
fn task_specs(text: &str) -> Vec<Option<String>> {
    let Ok(table) = text.parse::<toml::Table>() else { return Vec::new() };
    let Some(tasks) = table.get("tasks").and_then(toml::Value::as_array) else { return Vec::new() };
    tasks.iter().map(|task| task.get("spec").and_then(toml::Value::as_str).map(str::to_owned)).collect()
}

/// `name` as a path under the upload root: relative, plain components only.
fn safe_name(name: &str) -> Result<PathBuf, ApiError> {
    let refuse =
        |why: &str| ApiError::bad_request("invalid_upload_name", &format!("the upload name {name:?} {why}"));
    if name.is_empty() {
        return Err(refuse("is empty; give each file its path under the upload root as its file name"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(refuse(&format!("is longer than {MAX_NAME_BYTES} bytes")));
    }
    if name.contains(['\0', '\\']) {
        return Err(refuse("contains a NUL or a backslash"));
    }
    if name.starts_with('/') {
        return Err(refuse("is absolute; expected a path relative to the upload root"));
    }
    let path = Path::new(name);
    let mut depth = 0;
    for component in path.components() {
        match component {
            Component::Normal(_) => depth += 1,
            _ => return Err(refuse("has a `.` or `..` part; expected a plain relative path")),
        }
    }
    // `Path::components` drops `.` and repeated or trailing slashes silently; refuse them too so
    // that one file has exactly one name.
    if name.split('/').any(|part| part.is_empty() || part == ".") {
        return Err(refuse("has an empty or `.` part; expected a plain relative path"));
    }
    if depth > MAX_DEPTH {
        return Err(refuse(&format!("is more than {MAX_DEPTH} folders deep")));
    }
    Ok(path.to_owned())
}

/// Streams one file part to its place, refusing it past the limits; answers the new total.
async fn write_file(
    staged: &Staged,
    relative: &Path,
    name: &str,
    mut field: Field<'_>,
    limits: UploadLimits,
    mut total: u64,
) -> Result<u64, ApiError> {
    let path = staged.files().join(relative);
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(|error| clash(name, &error))?;
    }
    let executable = field.headers().get(EXECUTABLE).is_some_and(|value| value == "true");
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if executable { 0o700 } else { 0o600 })
        .open(&path)
        .await
        .map_err(|error| clash(name, &error))?;
    let mut size: u64 = 0;
    while let Some(chunk) = field.chunk().await.map_err(bad_body)? {
        let length = chunk.len() as u64;
        size = size.checked_add(length).filter(|&size| size <= limits.max_file_bytes).ok_or_else(|| {
            too_large(format!(
                "the file {name:?} is larger than {} bytes (the `upload_max_file_bytes` limit)",
                limits.max_file_bytes
            ))
        })?;
        total =
            total.checked_add(length).filter(|&total| total <= limits.max_total_bytes).ok_or_else(|| {
                too_large(format!(
                    "the upload is larger than {} bytes (the `upload_max_bytes` limit)",
                    limits.max_total_bytes
                ))
            })?;
        file.write_all(&chunk).await.map_err(|error| {
            ApiError::internal("upload_failed", &format!("cannot stage {name:?}: {error}"))
        })?;
    }
    file.flush()
        .await
        .map_err(|error| ApiError::internal("upload_failed", &format!("cannot stage {name:?}: {error}")))?;
    Ok(total)
}

/// An uploaded task spec's text, refused past [`MAX_SPEC_BYTES`] before it is read.
async fn read_task_spec(path: &Path, field: &str) -> Result<String, ApiError> {
    let unreadable = |why: String| ApiError::bad_request("invalid_upload", &format!("`{field}`: {why}"));
    let size = tokio::fs::metadata(path).await.map_err(|error| unreadable(error.to_string()))?.len();
    if size > MAX_SPEC_BYTES as u64 {
        return Err(too_large(format!("`{field}` names a spec larger than {MAX_SPEC_BYTES} bytes")));
    }
    tokio::fs::read_to_string(path).await.map_err(|error| unreadable(format!("not a text file ({error})")))
}

/// A text part of at most `max` bytes.
async fn read_text(mut field: Field<'_>, max: usize, what: &str) -> Result<String, ApiError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(bad_body)? {
        if bytes.len().saturating_add(chunk.len()) > max {
            return Err(too_large(format!("the `{what}` part is larger than {max} bytes")));
        }
        bytes.extend_from_slice(&chunk);
    }
    String::from_utf8(bytes)
        .map_err(|_| ApiError::bad_request("invalid_upload", &format!("the `{what}` part is not UTF-8 text")))
}

fn bad_body(error: axum::extract::multipart::MultipartError) -> ApiError {
    let status = error.status();
    let message = format!("the multipart body cannot be read: {}", error.body_text());
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(message)
    } else {
        ApiError::bad_request("invalid_upload", &message)
    }
}

fn too_large(message: String) -> ApiError {
    ApiError::with_status(StatusCode::PAYLOAD_TOO_LARGE, "upload_too_large", &message)
}

fn duplicate(name: &str) -> ApiError {
    ApiError::bad_request("invalid_upload_name", &format!("the upload name {name:?} is sent twice"))
}

/// A name that cannot be created: it clashes with a file or folder sent before it.
fn clash(name: &str, error: &std::io::Error) -> ApiError {
    ApiError::bad_request(
        "invalid_upload_name",
        &format!("the upload name {name:?} clashes with another file or folder of the upload ({error})"),
    )
}

fn missing(field: &str, path: &str) -> ApiError {
    ApiError::bad_request(
        "missing_upload",
        &format!("`{field}` names {path:?}, which is not among the uploaded files"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_names_are_accepted() {
        for good in ["a.txt", "f/0/data.txt", "in/0/dir/sub/x.bin", "..a", "a..b/c"] {
            assert!(safe_name(good).is_ok(), "{good}");
        }
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a/./b", "./a", "a//b", "a/", "a\0b", "a\\b"] {
            assert!(safe_name(bad).is_err(), "{bad:?}");
        }
        let deep = vec!["d"; MAX_DEPTH + 1].join("/");
        assert!(safe_name(&deep).is_err());
    }

    #[test]
    fn a_spec_may_name_only_what_was_uploaded() {
        let files: BTreeSet<String> = ["f/0/m.wasm", "f/1/data/a.txt", "task.toml"].map(String::from).into();
        let folders = BTreeSet::from(["f/2/empty".to_owned()]);
        let uploaded = Uploaded { files: &files, folders: &folders };
        let spec = |module: &str, input: &str| {
            format!("kind = \"wasi\"\nmodule = {module:?}\ninputs = [{input:?}]\n")
        };
        let root = Path::new("");
        assert!(uploaded.check_spec(&spec("f/0/m.wasm", "f/1/data"), root, "").is_ok());
        assert!(uploaded.check_spec(&spec("f/0/m.wasm", "f/2/empty"), root, "").is_ok());
        assert!(uploaded.check_spec(&spec("../f/0/m.wasm", "../f/1/data/a.txt"), Path::new("t"), "").is_ok());
        for (module, input, code) in [
            ("f/0/gone.wasm", "f/1/data", "missing_upload"),
            ("f/0/m.wasm", "f/1/dat", "missing_upload"),
            ("/etc/passwd", "f/1/data", "invalid_upload"),
            ("../../etc/passwd", "f/1/data", "invalid_upload"),
        ] {
            let error = uploaded.check_spec(&spec(module, input), root, "").unwrap_err();
            assert_eq!(error.code(), code, "{module} {input}");
        }
    }
}
