//! The blob store: content addressed by BLAKE3, each blob beside its bao outboard, so any range
//! of it can be sent with the proof that it belongs to the hash.
//!
//! Layout under `<data-dir>/blobs/`:
//!
//! ```text
//! complete/HASH        the blob's bytes (HASH is 64 lower-case hex digits)
//! complete/HASH.obao   its outboard: the tree's hash pairs in pre-order, 16 KiB chunk groups
//! partial/HASH         a download: only verified chunk groups were written, the rest is a hole
//! partial/HASH.obao    the verified hash pairs received so far
//! partial/HASH.size    the size the sender claimed (8 bytes, little endian)
//! tags/NAME            what keeps a blob alive: `raw HASH` or `folder HASH`
//! tmp/                 imports being hashed
//! ```
//!
//! A blob enters `complete/` only by rename, after its data and outboard are synced, so a crash
//! leaves a blob either complete or absent. A partial download holds nothing unverified, and
//! what it holds is found again after a restart by checking it against the root hash
//! ([`BlobStore::partial`]), so no progress marker can disagree with the data.
//!
//! Blobs are kept while a tag names them (a folder tag keeps its manifest and every file it
//! lists); [`BlobStore::gc`] removes the rest.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use bao_tree::io::outboard::PreOrderOutboard;
use bao_tree::io::sync::valid_ranges;
use bao_tree::{BaoTree, BlockSize, ChunkRanges};
use serde::{Deserialize, Serialize};

pub use crate::proto::{BlobHash, BlobRef, Format};
pub use hearth_api::transfer::Imported;

/// The chunk group: 16 chunks of 1 KiB. Each is verified on its own, so it is also the most a
/// download can lose to a crash, and what a corrupt byte costs a retry.
pub const BLOCK_SIZE: BlockSize = BlockSize::from_chunk_log(4);

/// Bytes in one chunk group.
pub const CHUNK_GROUP_BYTES: u64 = 16 * 1024;

/// The largest folder manifest accepted.
pub const MAX_MANIFEST_BYTES: u64 = 16 * 1024 * 1024;

/// The most files one folder may hold.
pub const MAX_FOLDER_FILES: usize = 100_000;

/// The longest path of a file in a folder blob, in bytes.
pub const MAX_MANIFEST_PATH: usize = 4096;

/// How many left-out entries an import lists by name; the rest are left out unnamed.
const MAX_SKIPPED_LISTED: usize = 1000;

/// A folder: its files, each a blob, sorted by path. Encoded as canonical JSON (keys sorted, no
/// whitespace), and itself stored as a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always 1.
    pub version: u32,
    /// The files, sorted by path, paths unique.
    pub files: Vec<ManifestFile>,
}

/// One file of a folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    /// Relative, `/`-separated, no `.` or `..` parts, no empty parts.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its BLAKE3 hash.
    pub hash: BlobHash,
    /// Whether it is executable.
    pub executable: bool,
}

impl Manifest {
    /// The canonical encoding (fields in alphabetical order, as serde writes these structs).
    pub fn encode(&self) -> Vec<u8> {
        // Field order of the structs is not alphabetical; go through a Value, whose maps sort.
        let value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        serde_json::to_vec(&value).unwrap_or_default()
    }

    /// Parses and checks a manifest.
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let bad = |why: String| StoreError::BadManifest(why);
        let manifest: Self = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if manifest.version != 1 {
            return Err(bad(format!("version {} is not 1", manifest.version)));
        }
        if manifest.files.len() > MAX_FOLDER_FILES {
            return Err(bad(format!("{} files, more than {MAX_FOLDER_FILES}", manifest.files.len())));
        }
        for pair in manifest.files.windows(2) {
            if pair[0].path >= pair[1].path {
                return Err(bad(format!("{:?} is not sorted before {:?}", pair[0].path, pair[1].path)));
            }
        }
        for file in &manifest.files {
            check_relative(&file.path).map_err(bad)?;
        }
        Ok(manifest)
    }

    /// The bytes of every file together.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// A path of a manifest: relative, `/`-separated, with nothing that could leave the folder.
fn check_relative(path: &str) -> Result<(), String> {
    let ok = !path.is_empty()
        && path.len() <= MAX_MANIFEST_PATH
        && !path.contains('\0')
        && !path.contains('\\')
        && path.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
    if ok { Ok(()) } else { Err(format!("{path:?} is not a safe relative path")) }
}

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{what} {}: {source}", hearth_api::local_file::shown(.path))]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The blob is not (completely) in the store.
    #[error("blob {0} is not in this agent's store")]
    Missing(BlobHash),
    /// A folder manifest is not valid.
    #[error("not a valid folder manifest: {0}")]
    BadManifest(String),
    /// A destination folder already holds files.
    #[error("{} already exists and is not an empty folder", .0.display())]
    Occupied(PathBuf),
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io { what, path, source }
}

/// A download in progress: what has been verified so far.
#[derive(Debug, Clone)]
pub struct Partial {
    /// The size the sender claimed.
    pub size: u64,
    /// Chunk ranges already verified against the hash.
    pub valid: ChunkRanges,
}

impl Partial {
    /// Verified bytes.
    pub fn valid_bytes(&self) -> u64 {
        ranges_bytes(&self.valid, self.size)
    }
}

/// Bytes covered by `ranges` in a blob of `size`.
pub fn ranges_bytes(ranges: &ChunkRanges, size: u64) -> u64 {
    let mut total = 0;
    let boundaries = ranges.boundaries();
    for pair in boundaries.chunks(2) {
        let start = pair[0].to_bytes().min(size);
        let end = pair.get(1).map_or(size, |e| e.to_bytes().min(size));
        total += end.saturating_sub(start);
    }
    total
}

/// The blob store of one agent. Every method blocks (file I/O); async callers use the blocking
/// pool.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
    /// Held while a download becomes complete: two downloads of one blob share its partial files,
    /// and only the first to finish installs them.
    finishing: std::sync::Arc<std::sync::Mutex<()>>,
}

impl BlobStore {
    /// Opens (creating) the store at `root`, normally `<data-dir>/blobs`, and removes imports a
    /// crash left in `tmp/`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        for dir in ["complete", "partial", "tags", "tmp"] {
            let path = root.join(dir);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&path)
                .map_err(io_error("cannot create", &path))?;
        }
        let tmp = root.join("tmp");
        if let Ok(entries) = fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(Self { root: root.to_owned(), finishing: std::sync::Arc::default() })
    }

    /// The store's folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn complete_path(&self, hash: BlobHash) -> PathBuf {
        self.root.join("complete").join(hash.to_hex())
    }

    fn complete_outboard(&self, hash: BlobHash) -> PathBuf {
        self.root.join("complete").join(format!("{hash}.obao"))
    }

    /// Where a download of `hash` keeps its verified data; a test corrupts or inspects it.
    pub fn partial_path(&self, hash: BlobHash) -> PathBuf {
        self.root.join("partial").join(hash.to_hex())
    }

    fn partial_outboard(&self, hash: BlobHash) -> PathBuf {
        self.root.join("partial").join(format!("{hash}.obao"))
    }

    fn partial_size(&self, hash: BlobHash) -> PathBuf {
        self.root.join("partial").join(format!("{hash}.size"))
    }

    /// The size of a complete blob, or `None` when it is not complete here.
    pub fn size(&self, hash: BlobHash) -> Option<u64> {
        let data = fs::metadata(self.complete_path(hash)).ok()?;
        fs::metadata(self.complete_outboard(hash)).ok()?;
        Some(data.len())
    }

    /// Opens a complete blob for sending: its data and its outboard.
    pub fn open_complete(&self, hash: BlobHash) -> Result<(File, PreOrderOutboard<File>), StoreError> {
        let path = self.complete_path(hash);
        let data = File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::Missing(hash),
            _ => StoreError::Io { what: "cannot open", path: path.clone(), source: e },
        })?;
        let size = data.metadata().map_err(io_error("cannot read", &path))?.len();
        let ob_path = self.complete_outboard(hash);
        let outboard = File::open(&ob_path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::Missing(hash),
            _ => StoreError::Io { what: "cannot open", path: ob_path.clone(), source: e },
        })?;
        Ok((
            data,
            PreOrderOutboard {
                root: crate::proto::to_blake3(hash),
                tree: BaoTree::new(size, BLOCK_SIZE),
                data: outboard,
            },
        ))
    }

    /// Reads a whole complete blob into memory, up to `limit` bytes.
    pub fn read(&self, hash: BlobHash, limit: u64) -> Result<Vec<u8>, StoreError> {
        let path = self.complete_path(hash);
        let file = File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::Missing(hash),
            _ => StoreError::Io { what: "cannot open", path: path.clone(), source: e },
        })?;
        let mut bytes = Vec::new();
        file.take(limit.saturating_add(1)).read_to_end(&mut bytes).map_err(io_error("cannot read", &path))?;
        if bytes.len() as u64 > limit {
            return Err(StoreError::BadManifest(format!("larger than {limit} bytes")));
        }
        Ok(bytes)
    }

    /// The manifest of a complete folder blob.
    pub fn manifest(&self, hash: BlobHash) -> Result<Manifest, StoreError> {
        Manifest::decode(&self.read(hash, MAX_MANIFEST_BYTES)?)
    }

    /// Imports one file: copied into the store (a later change of the original changes nothing),
    /// hashed, and kept. Identical content is stored once.
    pub fn import_file(&self, path: &Path) -> Result<(BlobHash, u64), StoreError> {
        let tmp = self.tmp_path();
        let result = (|| {
            fs::copy(path, &tmp).map_err(io_error("cannot copy", path))?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
                .map_err(io_error("cannot chmod", &tmp))?;
            self.adopt(&tmp)
        })();
        let _ = fs::remove_file(&tmp);
        result
    }

    /// Imports bytes held in memory.
    pub fn import_bytes(&self, bytes: &[u8]) -> Result<(BlobHash, u64), StoreError> {
        let tmp = self.tmp_path();
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_error("cannot create", &tmp))?;
            file.write_all(bytes).map_err(io_error("cannot write", &tmp))?;
            self.adopt(&tmp)
        })();
        let _ = fs::remove_file(&tmp);
        result
    }

    fn tmp_path(&self) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.root.join("tmp").join(format!("{}-{n}", std::process::id()))
    }

    /// Hashes a file in `tmp/`, writes its outboard, and moves both into `complete/`.
    fn adopt(&self, tmp: &Path) -> Result<(BlobHash, u64), StoreError> {
        let data = File::open(tmp).map_err(io_error("cannot open", tmp))?;
        let size = data.metadata().map_err(io_error("cannot read", tmp))?.len();
        let tree = BaoTree::new(size, BLOCK_SIZE);
        let ob_tmp = tmp.with_extension("obao");
        let result = (|| {
            let ob_file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&ob_tmp)
                .map_err(io_error("cannot create", &ob_tmp))?;
            let mut outboard =
                PreOrderOutboard { root: bao_tree::blake3::Hash::from_bytes([0; 32]), tree, data: ob_file };
            let reader = io::BufReader::with_capacity(1 << 20, &data);
            let root = bao_tree::io::sync::outboard(reader, tree, &mut outboard)
                .map_err(io_error("cannot hash", tmp))?;
            let hash = crate::proto::blob_hash(root);
            if self.size(hash).is_none() {
                outboard.data.sync_all().map_err(io_error("cannot sync", &ob_tmp))?;
                data.sync_all().map_err(io_error("cannot sync", tmp))?;
                self.install(hash, tmp, &ob_tmp)?;
            }
            Ok((hash, size))
        })();
        let _ = fs::remove_file(&ob_tmp);
        result
    }

    /// Moves synced data and outboard files into `complete/`, outboard first, so a blob whose
    /// data file exists always has its outboard.
    fn install(&self, hash: BlobHash, data: &Path, outboard: &Path) -> Result<(), StoreError> {
        let ob_dest = self.complete_outboard(hash);
        fs::rename(outboard, &ob_dest).map_err(io_error("cannot move into", &ob_dest))?;
        let dest = self.complete_path(hash);
        fs::rename(data, &dest).map_err(io_error("cannot move into", &dest))?;
        let dir = self.root.join("complete");
        File::open(&dir).and_then(|d| d.sync_all()).map_err(io_error("cannot sync", &dir))
    }

    /// Imports a folder: every regular file below it (symlinks and special files are left out
    /// and listed), and a manifest naming them.
    pub fn import_folder(&self, dir: &Path) -> Result<Imported, StoreError> {
        let mut files = Vec::new();
        let mut skipped = Vec::new();
        self.walk(dir, "", &mut files, &mut skipped)?;
        files.sort_by(|a: &ManifestFile, b| a.path.cmp(&b.path));
        if files.len() > MAX_FOLDER_FILES {
            return Err(StoreError::BadManifest(format!(
                "{} holds more than {MAX_FOLDER_FILES} files",
                dir.display()
            )));
        }
        let manifest = Manifest { version: 1, files };
        let (hash, _) = self.import_bytes(&manifest.encode())?;
        Ok(Imported {
            blob: BlobRef { hash, format: Format::Folder },
            size: manifest.total_size(),
            files: manifest.files.len() as u64,
            skipped,
        })
    }

    /// Every regular file under `dir`, by its path relative to it, folder after folder: a loop
    /// over pending folders, not a recursion, so a job's output nested thousands of folders deep
    /// costs no stack. A folder whose path is already as long as a manifest path may be is not
    /// entered, and is listed as skipped.
    fn walk(
        &self,
        dir: &Path,
        prefix: &str,
        files: &mut Vec<ManifestFile>,
        skipped: &mut Vec<String>,
    ) -> Result<(), StoreError> {
        let mut pending = vec![(dir.to_owned(), prefix.to_owned())];
        while let Some((dir, prefix)) = pending.pop() {
            let entries = fs::read_dir(&dir).map_err(io_error("cannot list", &dir))?;
            for entry in entries {
                let entry = entry.map_err(io_error("cannot list", &dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let relative = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
                let path = entry.path();
                // Never follows a symlink: a job's outputs may point anywhere on the host.
                let meta = fs::symlink_metadata(&path).map_err(io_error("cannot read", &path))?;
                if meta.is_dir() && relative.len() < MAX_MANIFEST_PATH {
                    pending.push((path, relative));
                } else if meta.is_file() && check_relative(&relative).is_ok() {
                    let (hash, size) = self.import_file(&path)?;
                    files.push(ManifestFile {
                        path: relative,
                        size,
                        hash,
                        executable: meta.permissions().mode() & 0o111 != 0,
                    });
                } else if skipped.len() < MAX_SKIPPED_LISTED {
                    skipped.push(relative);
                }
                if files.len() > MAX_FOLDER_FILES {
                    return Err(StoreError::BadManifest(format!("more than {MAX_FOLDER_FILES} files")));
                }
            }
        }
        Ok(())
    }

    /// Imports a file or a folder.
    pub fn import(&self, path: &Path) -> Result<Imported, StoreError> {
        let meta = fs::metadata(path).map_err(io_error("cannot read", path))?;
        if meta.is_dir() {
            self.import_folder(path)
        } else {
            let (hash, size) = self.import_file(path)?;
            Ok(Imported { blob: BlobRef { hash, format: Format::Raw }, size, files: 1, skipped: Vec::new() })
        }
    }

    /// Writes a complete blob to `dest`: a file for a raw blob, a folder (which must not exist or
    /// be empty) for a folder. Files are written beside their destination and renamed into it.
    pub fn export(&self, blob: BlobRef, dest: &Path) -> Result<(), StoreError> {
        match blob.format {
            Format::Raw => self.export_file(blob.hash, dest, false),
            Format::Folder => {
                let manifest = self.manifest(blob.hash)?;
                if dest.exists() {
                    let empty = fs::read_dir(dest).map(|mut d| d.next().is_none()).unwrap_or(false);
                    if !empty {
                        return Err(StoreError::Occupied(dest.to_owned()));
                    }
                }
                fs::create_dir_all(dest).map_err(io_error("cannot create", dest))?;
                for file in &manifest.files {
                    let target = dest.join(file.path.split('/').collect::<PathBuf>());
                    debug_assert!(target.components().all(|c| !matches!(c, Component::ParentDir)));
                    if let Some(parent) = target.parent() {
                        fs::create_dir_all(parent).map_err(io_error("cannot create", parent))?;
                    }
                    self.export_file(file.hash, &target, file.executable)?;
                }
                Ok(())
            }
        }
    }

    fn export_file(&self, hash: BlobHash, dest: &Path, executable: bool) -> Result<(), StoreError> {
        let source = self.complete_path(hash);
        if !source.exists() {
            return Err(StoreError::Missing(hash));
        }
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dest.with_file_name(format!(".{name}.hearth-tmp"));
        let result = (|| {
            fs::copy(&source, &tmp).map_err(io_error("cannot write", &tmp))?;
            let mode = if executable { 0o755 } else { 0o644 };
            fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
                .map_err(io_error("cannot chmod", &tmp))?;
            fs::rename(&tmp, dest).map_err(io_error("cannot write", dest))
        })();
        let _ = fs::remove_file(&tmp);
        result
    }

    /// What a download of `hash` already holds, checked against the hash; `None` when there is
    /// no download of it.
    pub fn partial(&self, hash: BlobHash) -> Result<Option<Partial>, StoreError> {
        let size_path = self.partial_size(hash);
        let size = match fs::read(&size_path) {
            Ok(bytes) => match <[u8; 8]>::try_from(bytes.as_slice()) {
                Ok(b) => u64::from_le_bytes(b),
                Err(_) => {
                    // Torn by a crash before any data could have been written: start again.
                    self.remove_partial(hash);
                    return Ok(None);
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::Io { what: "cannot read", path: size_path, source: e }),
        };
        let (data, outboard) = self.open_partial(hash, size)?;
        let mut valid = ChunkRanges::empty();
        for range in valid_ranges(&outboard, &data, &ChunkRanges::all()) {
            let range = range.map_err(io_error("cannot check", &self.partial_path(hash)))?;
            valid |= ChunkRanges::from(range);
        }
        Ok(Some(Partial { size, valid }))
    }

    /// Starts (or continues) a download of `hash` of `size` bytes; returns where verified data
    /// and hash pairs go. A different claimed size than the one kept starts again from nothing.
    pub fn begin_partial(
        &self,
        hash: BlobHash,
        size: u64,
    ) -> Result<(File, PreOrderOutboard<File>), StoreError> {
        let size_path = self.partial_size(hash);
        let kept = fs::read(&size_path)
            .ok()
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(u64::from_le_bytes);
        if kept != Some(size) {
            self.remove_partial(hash);
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&size_path)
                .map_err(io_error("cannot create", &size_path))?;
            file.write_all(&size.to_le_bytes()).map_err(io_error("cannot write", &size_path))?;
            file.sync_all().map_err(io_error("cannot sync", &size_path))?;
        }
        self.open_partial(hash, size)
    }

    fn open_partial(&self, hash: BlobHash, size: u64) -> Result<(File, PreOrderOutboard<File>), StoreError> {
        let open = |path: PathBuf| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(io_error("cannot open", &path))
        };
        let data = open(self.partial_path(hash))?;
        let outboard = open(self.partial_outboard(hash))?;
        Ok((
            data,
            PreOrderOutboard {
                root: crate::proto::to_blake3(hash),
                tree: BaoTree::new(size, BLOCK_SIZE),
                data: outboard,
            },
        ))
    }

    /// Makes a finished download a complete blob: synced, then moved into `complete/`. When
    /// another download of the same blob (they share the partial files) finished first, the blob
    /// is complete already and there is nothing left to move.
    pub fn finish_partial(&self, hash: BlobHash, size: u64) -> Result<(), StoreError> {
        let _finishing = self.finishing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.complete_path(hash).exists() && self.complete_outboard(hash).exists() {
            self.remove_partial(hash);
            return Ok(());
        }
        let data_path = self.partial_path(hash);
        let ob_path = self.partial_outboard(hash);
        let data =
            OpenOptions::new().write(true).open(&data_path).map_err(io_error("cannot open", &data_path))?;
        // A blob ending in a hole (all zeros) must still have its full length.
        data.set_len(size).map_err(io_error("cannot extend", &data_path))?;
        data.sync_all().map_err(io_error("cannot sync", &data_path))?;
        let outboard =
            OpenOptions::new().write(true).open(&ob_path).map_err(io_error("cannot open", &ob_path))?;
        outboard.sync_all().map_err(io_error("cannot sync", &ob_path))?;
        self.install(hash, &data_path, &ob_path)?;
        let _ = fs::remove_file(self.partial_size(hash));
        Ok(())
    }

    /// Drops a download and everything it held.
    pub fn remove_partial(&self, hash: BlobHash) {
        for path in [self.partial_path(hash), self.partial_outboard(hash), self.partial_size(hash)] {
            let _ = fs::remove_file(path);
        }
    }

    /// Keeps `blob` (and, for a folder, every file it lists) until the tag is removed.
    pub fn tag(&self, name: &str, blob: BlobRef) -> Result<(), StoreError> {
        let path = self.tag_path(name)?;
        // A name of its own: the same tag may be written twice at once (one file added twice).
        let tmp = self.tmp_path();
        let text = format!("{} {}\n", blob.format.name(), blob.hash);
        fs::write(&tmp, text).map_err(io_error("cannot write", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_error("cannot write", &path))
    }

    /// Removes a tag; the blobs it kept go at the next [`gc`](Self::gc) unless another tag keeps them.
    pub fn untag(&self, name: &str) -> Result<(), StoreError> {
        let path = self.tag_path(name)?;
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(StoreError::Io { what: "cannot remove", path, source: e })
            }
            _ => Ok(()),
        }
    }

    fn tag_path(&self, name: &str) -> Result<PathBuf, StoreError> {
        let ok = !name.is_empty()
            && name.len() <= 200
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(StoreError::BadManifest(format!("{name:?} is not a tag name")));
        }
        Ok(self.root.join("tags").join(name))
    }

    /// Every tag and what it keeps.
    pub fn tags(&self) -> Result<BTreeMap<String, BlobRef>, StoreError> {
        let dir = self.root.join("tags");
        let mut tags = BTreeMap::new();
        for entry in fs::read_dir(&dir).map_err(io_error("cannot list", &dir))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                continue;
            }
            let text = fs::read_to_string(entry.path()).unwrap_or_default();
            let mut words = text.split_whitespace();
            let format = match words.next() {
                Some("raw") => Format::Raw,
                Some("folder") => Format::Folder,
                _ => continue,
            };
            if let Some(Ok(hash)) = words.next().map(str::parse) {
                tags.insert(name, BlobRef { hash, format });
            }
        }
        Ok(tags)
    }

    /// Removes every complete blob no tag keeps, and downloads no tag names. Returns what was
    /// removed: blobs and bytes.
    pub fn gc(&self) -> Result<(u64, u64), StoreError> {
        let mut live = HashSet::new();
        for blob in self.tags()?.into_values() {
            live.insert(blob.hash);
            if blob.format == Format::Folder
                && let Ok(manifest) = self.manifest(blob.hash)
            {
                live.extend(manifest.files.iter().map(|f| f.hash));
            }
        }
        let (mut blobs, mut bytes) = (0, 0);
        for dir in ["complete", "partial"] {
            let dir = self.root.join(dir);
            for entry in fs::read_dir(&dir).map_err(io_error("cannot list", &dir))?.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let stem = name.split('.').next().unwrap_or_default();
                let Ok(hash) = stem.parse::<BlobHash>() else { continue };
                if live.contains(&hash) {
                    continue;
                }
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                if fs::remove_file(entry.path()).is_ok() && name.len() == 64 {
                    blobs += 1;
                    bytes += size;
                }
            }
        }
        Ok((blobs, bytes))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom};

    use bao_tree::io::sync::{DecodeResponseIter, encode_ranges};

    use super::*;

    fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    #[test]
    fn a_blob_is_addressed_by_its_plain_blake3_hash_and_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        let bytes = random_bytes(100_000, 1);
        let (hash, size) = store.import_bytes(&bytes).unwrap();
        assert_eq!(
            hash,
            crate::proto::blob_hash(bao_tree::blake3::hash(&bytes)),
            "the same hash b3sum prints"
        );
        assert_eq!(size, 100_000);
        let (again, _) = store.import_bytes(&bytes).unwrap();
        assert_eq!(again, hash);
        assert_eq!(
            fs::read_dir(dir.path().join("blobs/complete")).unwrap().count(),
            2,
            "data and outboard, once"
        );
        assert_eq!(fs::read_dir(dir.path().join("blobs/tmp")).unwrap().count(), 0);
    }

    #[test]
    fn a_download_keeps_only_verified_groups_and_finds_them_again() {
        let dir = tempfile::tempdir().unwrap();
        let sender = BlobStore::open(&dir.path().join("a")).unwrap();
        let receiver = BlobStore::open(&dir.path().join("b")).unwrap();
        let bytes = random_bytes(1_000_000, 2);
        let (hash, size) = sender.import_bytes(&bytes).unwrap();
        let (data, outboard) = sender.open_complete(hash).unwrap();
        let mut encoded = Vec::new();
        encode_ranges(&data, &outboard, &ChunkRanges::all(), &mut encoded).unwrap();

        // Receive only the first 300 items (parents and groups) of the response.
        let (mut target, mut ob) = receiver.begin_partial(hash, size).unwrap();
        let tree = BaoTree::new(size, BLOCK_SIZE);
        let ranges = ChunkRanges::all();
        let iter = DecodeResponseIter::new(crate::proto::to_blake3(hash), tree, encoded.as_slice(), &ranges);
        for item in iter.take(30) {
            match item.unwrap() {
                bao_tree::io::BaoContentItem::Parent(p) => {
                    bao_tree::io::sync::OutboardMut::save(&mut ob, p.node, &p.pair).unwrap()
                }
                bao_tree::io::BaoContentItem::Leaf(l) => {
                    positioned_io::WriteAt::write_all_at(&mut target, l.offset, &l.data).unwrap()
                }
            }
        }
        let partial = receiver.partial(hash).unwrap().unwrap();
        assert_eq!(partial.size, size);
        let had = partial.valid_bytes();
        assert!(had > 0 && had < size, "some but not all: {had}");
        assert_eq!(had % CHUNK_GROUP_BYTES, 0);

        // A byte flipped in a verified group on disk makes that group missing again.
        let mut file = OpenOptions::new().read(true).write(true).open(receiver.partial_path(hash)).unwrap();
        file.seek(SeekFrom::Start(5)).unwrap();
        file.write_all(&[bytes[5] ^ 1]).unwrap();
        let after = receiver.partial(hash).unwrap().unwrap();
        assert_eq!(after.valid_bytes(), had - CHUNK_GROUP_BYTES);
    }

    /// Every item of a whole response into the partial files.
    fn receive_all(receiver: &BlobStore, sender: &BlobStore, hash: BlobHash, size: u64) {
        let (data, outboard) = sender.open_complete(hash).unwrap();
        let mut encoded = Vec::new();
        encode_ranges(&data, &outboard, &ChunkRanges::all(), &mut encoded).unwrap();
        let (mut target, mut ob) = receiver.begin_partial(hash, size).unwrap();
        let ranges = ChunkRanges::all();
        let tree = BaoTree::new(size, BLOCK_SIZE);
        for item in DecodeResponseIter::new(crate::proto::to_blake3(hash), tree, encoded.as_slice(), &ranges)
        {
            match item.unwrap() {
                bao_tree::io::BaoContentItem::Parent(p) => {
                    bao_tree::io::sync::OutboardMut::save(&mut ob, p.node, &p.pair).unwrap()
                }
                bao_tree::io::BaoContentItem::Leaf(l) => {
                    positioned_io::WriteAt::write_all_at(&mut target, l.offset, &l.data).unwrap()
                }
            }
        }
    }

    #[test]
    fn two_downloads_of_one_blob_at_once_both_end_with_it_complete() {
        let dir = tempfile::tempdir().unwrap();
        let sender = BlobStore::open(&dir.path().join("a")).unwrap();
        let receiver = BlobStore::open(&dir.path().join("b")).unwrap();
        let bytes = random_bytes(300_000, 3);
        let (hash, size) = sender.import_bytes(&bytes).unwrap();
        // Two tasks fetch the same module at once: both write the shared partial files, and each
        // finishes; the second finds the blob complete already.
        receive_all(&receiver, &sender, hash, size);
        receive_all(&receiver, &sender, hash, size);
        let other = receiver.clone();
        let first = std::thread::spawn(move || other.finish_partial(hash, size));
        let second = receiver.finish_partial(hash, size);
        first.join().unwrap().unwrap();
        second.unwrap();
        assert_eq!(receiver.size(hash), Some(size));
        let (mut data, _) = receiver.open_complete(hash).unwrap();
        let mut read = Vec::new();
        data.read_to_end(&mut read).unwrap();
        assert_eq!(read, bytes);
        assert!(receiver.partial(hash).unwrap().is_none(), "a partial download was left behind");

        // The same tag written twice at once: both land, one file.
        let blob = BlobRef { hash, format: Format::Raw };
        let tagger = receiver.clone();
        let again = std::thread::spawn(move || (0..50).try_for_each(|_| tagger.tag("added-x", blob)));
        (0..50).try_for_each(|_| receiver.tag("added-x", blob)).unwrap();
        again.join().unwrap().unwrap();
        assert_eq!(receiver.tags().unwrap().get("added-x"), Some(&blob));
    }

    #[test]
    fn a_folder_round_trips_without_its_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("sub/deeper")).unwrap();
        fs::write(src.join("a.txt"), "alpha").unwrap();
        fs::write(src.join("sub/b.bin"), random_bytes(70_000, 3)).unwrap();
        fs::write(src.join("sub/deeper/same.txt"), "alpha").unwrap();
        fs::write(src.join("run.sh"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("link")).unwrap();

        let imported = store.import(&src).unwrap();
        assert_eq!(imported.files, 4);
        assert_eq!(imported.skipped, vec!["link".to_owned()]);
        let manifest = store.manifest(imported.blob.hash).unwrap();
        let paths: Vec<_> = manifest.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["a.txt", "run.sh", "sub/b.bin", "sub/deeper/same.txt"]);

        let out = dir.path().join("out");
        store.export(imported.blob, &out).unwrap();
        assert_eq!(fs::read(out.join("sub/b.bin")).unwrap(), fs::read(src.join("sub/b.bin")).unwrap());
        assert_eq!(fs::read_to_string(out.join("sub/deeper/same.txt")).unwrap(), "alpha");
        assert_eq!(fs::metadata(out.join("run.sh")).unwrap().permissions().mode() & 0o777, 0o755);
        assert!(!out.join("link").exists());
        let err = store.export(imported.blob, &out).unwrap_err();
        assert!(matches!(err, StoreError::Occupied(_)), "{err}");
    }

    #[test]
    fn a_manifest_that_leaves_its_folder_is_refused() {
        for path in ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", ""] {
            let manifest = Manifest {
                version: 1,
                files: vec![ManifestFile {
                    path: path.into(),
                    size: 0,
                    hash: BlobHash([0; 32]),
                    executable: false,
                }],
            };
            assert!(Manifest::decode(&manifest.encode()).is_err(), "{path:?} accepted");
        }
    }

    #[test]
    fn gc_keeps_what_tags_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("kept.txt"), "kept").unwrap();
        let folder = store.import(&src).unwrap();
        let (loose, _) = store.import_bytes(b"loose").unwrap();
        store.tag("results", folder.blob).unwrap();
        let (blobs, bytes) = store.gc().unwrap();
        assert_eq!((blobs, bytes), (1, 5));
        assert!(store.size(loose).is_none());
        let kept = store.manifest(folder.blob.hash).unwrap().files[0].hash;
        assert_eq!(store.size(kept), Some(4));
        store.untag("results").unwrap();
        assert_eq!(store.gc().unwrap().0, 2);
    }
}
