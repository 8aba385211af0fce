//! Native job images: an OCI image archive (as `docker save` or `skopeo copy … oci-archive:` write
//! it), an older `docker save` archive, or a plain rootfs tar, unpacked once into a cache keyed by
//! the archive's SHA-256, together with the parts of the image's config a job's start uses.
//!
//! The archive is untrusted. Every index, manifest, config and layer an OCI layout names must match
//! its descriptor's digest and size, and an older `docker save` archive's layers must match the
//! config's `rootfs.diff_ids`; a mismatch refuses the image. Entries are unpacked with the `tar`
//! crate's `unpack_in`, which refuses absolute paths, `..` and writes through symlinks that leave
//! the destination; device nodes and fifos are skipped (a job's `/dev` is the sandbox's own); the
//! total size is bounded. Layers are applied in order with their whiteouts (`.wh.NAME` removes
//! NAME, `.wh..wh..opq` empties a folder). An unpacked image is renamed into place only when
//! complete, so a crash or a bad archive never leaves a half image in the cache; the sandbox mounts
//! it read-only. Nothing here spawns: the runner calls it on the blocking pool.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};
use hearth_api::local_file;
use serde::Deserialize;

mod config;

pub use config::{DEFAULT_WORKDIR, ImageConfig, Launch};

/// The most bytes an image may unpack to.
pub const MAX_IMAGE_BYTES: u64 = 32 << 30;

/// The largest index, manifest or config document an archive may hold.
const MAX_DOCUMENT_BYTES: u64 = 4 << 20;

/// The file beside `rootfs` in a cache entry that holds the image's [`ImageConfig`] as JSON.
const CONFIG_FILE: &str = "config.json";

/// An image in the cache, ready for a job.
#[derive(Debug, Clone)]
pub struct Unpacked {
    /// The root filesystem folder, which the sandbox mounts read-only.
    pub rootfs: PathBuf,
    /// What the image's config says about starting it (empty for a plain rootfs tar).
    pub config: ImageConfig,
}

/// Unpacks `archive` into `cache_dir` unless already there, and returns the image.
pub fn unpack_cached(archive: &Path, cache_dir: &Path) -> anyhow::Result<Unpacked> {
    // A regular file only: a device or a named pipe would be read (or waited on) for ever.
    let file = local_file::open_regular(archive, MAX_IMAGE_BYTES, "image")?;
    let digest = sha256_of(file).with_context(|| format!("reading image {}", local_file::shown(archive)))?;
    let image_dir = cache_dir.join(&digest);
    if let Some(unpacked) = cached(&image_dir)? {
        return Ok(unpacked);
    }
    fs::create_dir_all(cache_dir).with_context(|| format!("creating {}", cache_dir.display()))?;
    // A staging folder of its own per unpack (removed on drop unless kept), so two jobs with the
    // same image never share or delete each other's half-made tree.
    let staging = tempfile::Builder::new().prefix(".unpack-").tempdir_in(cache_dir)?;
    let config =
        unpack(archive, staging.path()).with_context(|| format!("unpacking image {}", archive.display()))?;
    fs::write(staging.path().join(CONFIG_FILE), serde_json::to_vec_pretty(&config)?)?;
    let rootfs = image_dir.join("rootfs");
    match fs::rename(staging.path(), &image_dir) {
        Ok(()) => {
            // Renamed away: there is nothing left for the guard to remove.
            let _ = staging.keep();
        }
        Err(error) => match cached(&image_dir)? {
            // Another run unpacked the same archive meanwhile; theirs is as good as ours.
            Some(theirs) => return Ok(theirs),
            // An agent from before image configs were read left the rootfs alone: it is what this
            // archive unpacks to, so only the config is added (whole or not at all).
            None if rootfs.is_dir() => {
                let mut file = tempfile::NamedTempFile::new_in(&image_dir)?;
                file.write_all(&serde_json::to_vec_pretty(&config)?)?;
                file.persist(image_dir.join(CONFIG_FILE))
                    .context("adding the image's config to the cache")?;
            }
            None => return Err(error).context("moving the unpacked image into the cache"),
        },
    }
    Ok(Unpacked { rootfs, config })
}

/// The complete cache entry in `image_dir`, if there is one.
fn cached(image_dir: &Path) -> anyhow::Result<Option<Unpacked>> {
    let rootfs = image_dir.join("rootfs");
    match fs::read(image_dir.join(CONFIG_FILE)) {
        Ok(json) if rootfs.is_dir() => {
            let config = serde_json::from_slice(&json)
                .with_context(|| format!("reading the cached config in {}", image_dir.display()))?;
            Ok(Some(Unpacked { rootfs, config }))
        }
        Ok(_) => Ok(None),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error).with_context(|| format!("reading the cache entry {}", image_dir.display())),
    }
}

/// One layer to apply, and what it must hash to.
struct Layer {
    path: PathBuf,
    /// How the archive names it, for errors.
    name: String,
    check: Check,
}

enum Check {
    /// The SHA-256 of the blob as stored (an OCI descriptor's digest).
    Blob(String),
    /// The SHA-256 of the uncompressed tar (a `docker save` config's `rootfs.diff_ids`).
    Uncompressed(String),
}

/// What an archive holds: its config and its layers, base first.
struct Contents {
    config: ImageConfig,
    layers: Vec<Layer>,
}

/// Unpacks into `staging/rootfs`, using `staging/archive` for an image archive's blobs, and returns
/// the image's config.
fn unpack(archive: &Path, staging: &Path) -> anyhow::Result<ImageConfig> {
    let rootfs = staging.join("rootfs");
    fs::create_dir(&rootfs)?;
    let mut budget = MAX_IMAGE_BYTES;
    let outer = staging.join("archive");
    fs::create_dir(&outer)?;
    let file = File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    apply_layer(decompressed(file)?, &outer, &mut budget, false)?;
    let contents = if outer.join("oci-layout").is_file() && outer.join("index.json").is_file() {
        oci_contents(&outer)?
    } else if outer.join("manifest.json").is_file() {
        docker_contents(&outer)?
    } else {
        // A plain rootfs tar: what was unpacked is the image.
        fs::remove_dir(&rootfs)?;
        fs::rename(&outer, &rootfs)?;
        return Ok(ImageConfig::default());
    };
    let mut budget = MAX_IMAGE_BYTES;
    for layer in &contents.layers {
        apply_checked(layer, &rootfs, &mut budget)
            .with_context(|| format!("applying layer {}", layer.name))?;
    }
    fs::remove_dir_all(&outer)?;
    Ok(contents.config)
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// The config and layers of an OCI image layout. A multi-platform index is narrowed to this
/// machine's architecture; every document read and every layer is checked against its descriptor.
fn oci_contents(layout: &Path) -> anyhow::Result<Contents> {
    // The blob a descriptor names, of the size it says.
    let blob = |descriptor: &Descriptor| -> anyhow::Result<PathBuf> {
        let hex = sha256_hex(&descriptor.digest)?;
        let path = regular_file_beneath(layout, &Path::new("blobs/sha256").join(hex))?;
        let size = fs::symlink_metadata(&path)?.len();
        if size != descriptor.size {
            bail!("blob {} is {size} bytes, but its descriptor says {}", descriptor.digest, descriptor.size);
        }
        Ok(path)
    };
    let document = |descriptor: &Descriptor| -> anyhow::Result<Vec<u8>> {
        let bytes = read_document(&blob(descriptor)?)?;
        let actual = hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes));
        if actual != sha256_hex(&descriptor.digest)? {
            bail!(
                "blob {} does not match its digest: its content hashes to sha256:{actual}",
                descriptor.digest
            );
        }
        Ok(bytes)
    };
    let mut index: Index =
        serde_json::from_slice(&read_document(&layout.join("index.json"))?).context("parsing index.json")?;
    // An index may point at another index (one per platform); follow at most a few levels.
    for _ in 0..4 {
        let chosen = pick_platform(&index.manifests).context("the image index lists no manifest")?;
        let value: serde_json::Value =
            serde_json::from_slice(&document(chosen)?).context("parsing the image manifest")?;
        if chosen.media_type.contains("index") || value.get("manifests").is_some() {
            index = serde_json::from_value(value).context("reading a nested image index")?;
            continue;
        }
        let manifest: Manifest = serde_json::from_value(value).context("reading the image manifest")?;
        let config = ImageConfig::parse(&document(&manifest.config)?)?.config;
        let layers = manifest
            .layers
            .iter()
            .map(|layer| {
                Ok(Layer {
                    path: blob(layer)?,
                    name: layer.digest.clone(),
                    check: Check::Blob(sha256_hex(&layer.digest)?.to_owned()),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        return Ok(Contents { config, layers });
    }
    bail!("image indexes nest too deeply")
}

fn pick_platform(manifests: &[Descriptor]) -> Option<&Descriptor> {
    let arch = config::this_architecture();
    manifests
        .iter()
        .find(|m| m.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == arch))
        .or_else(|| manifests.iter().find(|m| m.platform.is_none()))
        .or_else(|| manifests.first())
}

/// The config and layers of a `docker save` archive from before Docker 25 (no OCI layout). Its
/// config is checked against its file name where that is a digest (`<sha256>.json`), and each
/// layer against the config's `rootfs.diff_ids`.
fn docker_contents(dir: &Path) -> anyhow::Result<Contents> {
    #[derive(Deserialize)]
    struct Entry {
        #[serde(rename = "Config")]
        config: String,
        #[serde(rename = "Layers")]
        layers: Vec<String>,
    }
    let text = read_document(&dir.join("manifest.json"))?;
    let entries: Vec<Entry> = serde_json::from_slice(&text).context("parsing manifest.json")?;
    let entry = entries.first().context("manifest.json lists no image")?;
    let bytes = read_document(&regular_file_beneath(dir, Path::new(&entry.config))?)?;
    let named =
        Path::new(&entry.config).file_name().and_then(|n| n.to_str()).map(|n| n.trim_end_matches(".json"));
    if let Some(expected) = named.filter(|name| is_sha256_hex(name)) {
        let actual = hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes));
        if actual != expected {
            bail!("the image config {} hashes to sha256:{actual}", entry.config);
        }
    }
    let parsed = ImageConfig::parse(&bytes)?;
    if parsed.diff_ids.len() != entry.layers.len() {
        bail!(
            "the image config lists {} layer digests (rootfs.diff_ids) for {} layers",
            parsed.diff_ids.len(),
            entry.layers.len()
        );
    }
    let layers = entry
        .layers
        .iter()
        .zip(&parsed.diff_ids)
        .map(|(layer, diff_id)| {
            Ok(Layer {
                path: regular_file_beneath(dir, Path::new(layer))?,
                name: layer.clone(),
                check: Check::Uncompressed(sha256_hex(diff_id)?.to_owned()),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Contents { config: parsed.config, layers })
}

/// The hex of a `sha256:` digest, which must be 64 lowercase hex digits.
fn sha256_hex(digest: &str) -> anyhow::Result<&str> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if is_sha256_hex(hex) => Ok(hex),
        _ => bail!("unsupported digest {digest:?}: expected sha256: and 64 lowercase hex digits"),
    }
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A small JSON document of the archive, read whole.
fn read_document(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let file = File::open(path).with_context(|| format!("opening {name}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_DOCUMENT_BYTES + 1).read_to_end(&mut bytes).with_context(|| format!("reading {name}"))?;
    if bytes.len() as u64 > MAX_DOCUMENT_BYTES {
        bail!("{name} is larger than {} MiB", MAX_DOCUMENT_BYTES >> 20);
    }
    Ok(bytes)
}

/// Applies one layer, then checks that what was read hashes to what the archive promised. A layer
/// that does not is refused with the whole staging folder, so its content never reaches the cache.
fn apply_checked(layer: &Layer, dest: &Path, budget: &mut u64) -> anyhow::Result<()> {
    let file = File::open(&layer.path).with_context(|| format!("opening {}", layer.path.display()))?;
    match &layer.check {
        Check::Blob(expected) => {
            let mut blob = Hashing::new(file);
            apply_layer(decompressed(&mut blob)?, dest, budget, true)?;
            blob.verify(&layer.name, expected)
        }
        Check::Uncompressed(expected) => {
            let mut tar = Hashing::new(decompressed(file)?);
            apply_layer(&mut tar, dest, budget, true)?;
            tar.verify(&layer.name, expected)
        }
    }
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    context: ring::digest::Context,
}

impl<R: Read> Hashing<R> {
    fn new(inner: R) -> Self {
        Self { inner, context: ring::digest::Context::new(&ring::digest::SHA256) }
    }

    /// Reads what is left and checks the SHA-256 of everything against `expected` (hex).
    fn verify(mut self, name: &str, expected: &str) -> anyhow::Result<()> {
        io::copy(&mut self, &mut io::sink())?;
        let actual = hex::encode(self.context.finish());
        if actual != expected {
            bail!(
                "layer {name} does not match its digest: it hashes to sha256:{actual}, not sha256:{expected}"
            );
        }
        Ok(())
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.context.update(&buf[..n]);
        Ok(n)
    }
}

/// A tar stream that may be gzip-compressed (told by its first bytes).
fn decompressed<'a>(reader: impl Read + 'a) -> anyhow::Result<Box<dyn Read + 'a>> {
    let mut reader = BufReader::new(reader);
    let magic = reader.fill_buf()?;
    if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        bail!("zstd-compressed layers are not supported; save the image uncompressed or with gzip");
    }
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(reader))
    } else {
        Box::new(reader)
    })
}

/// Unpacks one tar into `dest`, honouring whiteouts when `whiteouts` is set. What follows the
/// tar's end is read too (so a layer's digest covers it) and counts against `budget`.
fn apply_layer(reader: impl Read, dest: &Path, budget: &mut u64, whiteouts: bool) -> anyhow::Result<()> {
    let too_large = "the image is larger than 32 GiB unpacked";
    let mut archive = tar::Archive::new(reader);
    // Modes are kept but for setuid, setgid and sticky bits, which the tar crate then drops.
    archive.set_preserve_permissions(false);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            continue;
        }
        let size = entry.header().size()?;
        *budget = budget.checked_sub(size).context(too_large)?;
        let path = entry.path()?.into_owned();
        if whiteouts && let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            if name == ".wh..wh..opq" {
                let dir = safe_join(dest, path.parent().unwrap_or(Path::new("")))?;
                if let Ok(children) = fs::read_dir(&dir) {
                    for child in children.flatten() {
                        remove_any(&child.path())?;
                    }
                }
                continue;
            }
            if let Some(hidden) = name.strip_prefix(".wh.") {
                let target = safe_join(dest, &path.with_file_name(hidden))?;
                remove_any(&target)?;
                continue;
            }
        }
        if !entry.unpack_in(dest)? {
            bail!("entry {} would be written outside the image", path.display());
        }
    }
    let rest = io::copy(&mut archive.into_inner().take(budget.saturating_add(1)), &mut io::sink())?;
    *budget = budget.checked_sub(rest).context(too_large)?;
    Ok(())
}

/// `dest/relative`, refusing anything but plain names in `relative` and any symlink among the
/// folders on the way, so an earlier entry's link cannot send a whiteout out of the image.
fn safe_join(dest: &Path, relative: &Path) -> anyhow::Result<PathBuf> {
    let mut path = dest.to_owned();
    let components: Vec<Component<'_>> = relative.components().collect();
    for (i, component) in components.iter().enumerate() {
        match component {
            Component::Normal(name) => path.push(name),
            Component::CurDir => continue,
            _ => bail!("path {} leaves the image", relative.display()),
        }
        let last = i + 1 == components.len();
        if !last && fs::symlink_metadata(&path).is_ok_and(|meta| meta.file_type().is_symlink()) {
            bail!("path {} goes through a symlink", relative.display());
        }
    }
    Ok(path)
}

/// A regular file at `relative` under `root`, reached without following any symlink: blobs and
/// layers are named by the archive itself, which must not point the agent at other files.
fn regular_file_beneath(root: &Path, relative: &Path) -> anyhow::Result<PathBuf> {
    let path = safe_join(root, relative)?;
    let meta = fs::symlink_metadata(&path).with_context(|| format!("{} is missing", relative.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", relative.display());
    }
    Ok(path)
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

/// The SHA-256 of a file's content, as hex.
fn sha256_of(mut file: File) -> io::Result<String> {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        context.update(&buffer[..n]);
    }
    Ok(hex::encode(context.finish().as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, path, *data).expect("append");
        }
        builder.into_inner().expect("tar")
    }

    fn sha(bytes: &[u8]) -> String {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
    }

    fn descriptor(media_type: &str, bytes: &[u8]) -> String {
        format!(r#"{{"mediaType":"{media_type}","digest":"sha256:{}","size":{}}}"#, sha(bytes), bytes.len())
    }

    const CONFIG: &str = r#"{"os":"linux","config":{"Env":["PATH=/opt/bin:/bin","GREETING=hi"],
        "WorkingDir":"/app","Entrypoint":["/bin/run"],"Cmd":["--now"]}}"#;

    /// An OCI archive of `layers` (base first) and `config`; `stored` may change a blob's bytes
    /// after its descriptor was written.
    fn oci_archive(config: &str, layers: &[Vec<u8>], stored: impl Fn(Vec<u8>) -> Vec<u8>) -> Vec<u8> {
        let layer = "application/vnd.oci.image.layer.v1.tar";
        let layers_json: Vec<String> = layers.iter().map(|bytes| descriptor(layer, bytes)).collect();
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{},"layers":[{}]}}"#,
            descriptor("application/vnd.oci.image.config.v1+json", config.as_bytes()),
            layers_json.join(",")
        );
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{}]}}"#,
            descriptor("application/vnd.oci.image.manifest.v1+json", manifest.as_bytes())
        );
        let mut blobs = vec![config.as_bytes().to_vec(), manifest.into_bytes()];
        blobs.extend(layers.iter().cloned());
        let named: Vec<(String, Vec<u8>)> =
            blobs.into_iter().map(|bytes| (format!("blobs/sha256/{}", sha(&bytes)), stored(bytes))).collect();
        let mut entries: Vec<(&str, &[u8])> =
            vec![("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#), ("index.json", index.as_bytes())];
        entries.extend(named.iter().map(|(name, bytes)| (name.as_str(), bytes.as_slice())));
        tar_of(&entries)
    }

    /// Unpacks `bytes` as an image archive into a fresh cache; the error's whole chain on failure.
    fn unpack_bytes(bytes: &[u8]) -> (tempfile::TempDir, Result<Unpacked, String>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = dir.path().join("image.tar");
        fs::write(&archive, bytes).expect("archive");
        let result = unpack_cached(&archive, &dir.path().join("cache")).map_err(|e| format!("{e:#}"));
        (dir, result)
    }

    #[test]
    fn an_oci_archive_gives_its_layers_and_config_once() {
        let base = tar_of(&[("bin/run", b"one"), ("etc/gone", b"x")]);
        let top = tar_of(&[("bin/run", b"two"), ("etc/.wh.gone", b"")]);
        let (dir, result) = unpack_bytes(&oci_archive(CONFIG, &[base, top], |bytes| bytes));
        let unpacked = result.expect("unpacks");
        assert_eq!(fs::read(unpacked.rootfs.join("bin/run")).expect("run"), b"two");
        assert!(!unpacked.rootfs.join("etc/gone").exists());
        assert_eq!(unpacked.config.env["GREETING"], "hi");
        assert_eq!(unpacked.config.working_dir.as_deref(), Some("/app"));
        assert_eq!(
            (unpacked.config.entrypoint.as_slice(), unpacked.config.cmd.as_slice()),
            (&["/bin/run".to_owned()][..], &["--now".to_owned()][..])
        );
        // The second use finds the cache entry: a file added to it since is still there, and the
        // config comes back from the entry.
        fs::write(unpacked.rootfs.join("marker"), b"").expect("marker");
        let again = unpack_cached(&dir.path().join("image.tar"), &dir.path().join("cache")).expect("cached");
        assert_eq!(again.rootfs, unpacked.rootfs);
        assert!(again.rootfs.join("marker").exists());
        assert_eq!(again.config, unpacked.config);
    }

    /// What a test keeps of a blob in place of its bytes.
    type Stored = Box<dyn Fn(Vec<u8>) -> Vec<u8>>;

    #[test]
    fn blobs_that_do_not_match_their_descriptors_are_refused() {
        let good = tar_of(&[("etc/hello", b"good")]);
        let swapped = tar_of(&[("etc/hello", b"evil")]);
        assert_eq!(good.len(), swapped.len());
        let cases: [(&str, Stored); 3] = [
            // The same size, other bytes.
            (
                "does not match its digest",
                Box::new(move |bytes| if bytes == good { swapped.clone() } else { bytes }),
            ),
            // A longer layer.
            (
                "but its descriptor says",
                Box::new(|mut bytes: Vec<u8>| {
                    if bytes.starts_with(b"etc/") {
                        bytes.extend([0u8; 512]);
                    }
                    bytes
                }),
            ),
            // A config other than the one the manifest names.
            (
                "does not match its digest",
                Box::new(|bytes: Vec<u8>| {
                    if bytes == CONFIG.as_bytes() { CONFIG.replace("hi", "ho").into_bytes() } else { bytes }
                }),
            ),
        ];
        for (says, stored) in cases {
            let layer = tar_of(&[("etc/hello", b"good")]);
            let (dir, result) = unpack_bytes(&oci_archive(CONFIG, &[layer], stored));
            let error = result.expect_err("refused");
            assert!(error.contains(says), "{error}");
            // Nothing of it reached the cache.
            let cache: Vec<_> = fs::read_dir(dir.path().join("cache")).expect("cache").collect();
            assert!(cache.is_empty(), "{cache:?}");
        }
    }

    #[test]
    fn a_docker_save_archive_is_checked_against_its_config() {
        let layer = tar_of(&[("bin/tool", b"tool")]);
        let archive = |diff_id: &str| {
            let config = format!(
                r#"{{"os":"linux","config":{{"Cmd":["/bin/tool"]}},"rootfs":{{"diff_ids":["sha256:{diff_id}"]}}}}"#
            );
            let name = format!("{}.json", sha(config.as_bytes()));
            let manifest = format!(r#"[{{"Config":"{name}","Layers":["abc/layer.tar"]}}]"#);
            tar_of(&[
                ("manifest.json", manifest.as_bytes()),
                (&name, config.as_bytes()),
                ("abc/layer.tar", &layer),
            ])
        };
        let (_dir, result) = unpack_bytes(&archive(&sha(&layer)));
        let unpacked = result.expect("unpacks");
        assert_eq!(fs::read(unpacked.rootfs.join("bin/tool")).expect("tool"), b"tool");
        assert_eq!(unpacked.config.cmd, ["/bin/tool"]);
        let (_dir, result) = unpack_bytes(&archive(&"0".repeat(64)));
        let error = result.expect_err("refused");
        assert!(error.contains("does not match its digest"), "{error}");
    }

    #[test]
    fn an_entry_from_before_configs_gets_its_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = dir.path().join("image.tar");
        fs::write(&archive, oci_archive(CONFIG, &[tar_of(&[("bin/run", b"one")])], |bytes| bytes))
            .expect("archive");
        let cache = dir.path().join("cache");
        let old = cache.join(sha(&fs::read(&archive).expect("read")));
        fs::create_dir_all(old.join("rootfs/bin")).expect("old entry");
        fs::write(old.join("rootfs/bin/run"), b"one").expect("old file");
        let unpacked = unpack_cached(&archive, &cache).expect("unpacks");
        assert_eq!(unpacked.rootfs, old.join("rootfs"));
        assert_eq!(unpacked.config.env["GREETING"], "hi");
        assert_eq!(unpack_cached(&archive, &cache).expect("cached").config, unpacked.config);
    }

    /// A tar of one entry whose name is written as given, `..` and all (the `tar` crate's builder
    /// refuses such names).
    fn raw_entry(name: &str, kind: tar::EntryType, data: &[u8]) -> Vec<u8> {
        let mut header = tar::Header::new_old();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend(data);
        bytes.resize(bytes.len().div_ceil(512) * 512 + 1024, 0);
        bytes
    }

    #[test]
    fn hostile_layers_are_refused_and_touch_nothing_outside() {
        let outside = tempfile::tempdir().expect("outside");
        let victim = outside.path().join("victim");
        fs::write(&victim, b"keep").expect("victim");
        let cases = [
            raw_entry("../escaped", tar::EntryType::Regular, b"x"),
            raw_entry("a/../../.wh.victim", tar::EntryType::Regular, b""),
            raw_entry("../.wh..wh..opq", tar::EntryType::Regular, b""),
        ];
        for bytes in cases {
            let dir = tempfile::tempdir().expect("tempdir");
            let image = dir.path().join("image");
            fs::create_dir(&image).expect("image");
            // The victim is the image folder's sibling, where `..` leads.
            fs::write(dir.path().join("victim"), b"keep").expect("sibling");
            let mut budget = MAX_IMAGE_BYTES;
            assert!(apply_layer(bytes.as_slice(), &image, &mut budget, true).is_err());
            assert_eq!(fs::read(dir.path().join("victim")).expect("still there"), b"keep");
            assert!(!dir.path().join("escaped").exists());
        }
        // A whiteout through an earlier layer's symlink to a host folder.
        let dir = tempfile::tempdir().expect("tempdir");
        let mut budget = MAX_IMAGE_BYTES;
        let mut builder = tar::Builder::new(Vec::new());
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        link.set_cksum();
        builder.append_link(&mut link, "host", outside.path()).expect("link");
        let base = builder.into_inner().expect("tar");
        apply_layer(base.as_slice(), dir.path(), &mut budget, true).expect("a link alone is fine");
        let top = tar_of(&[("host/.wh.victim", b"")]);
        let error = apply_layer(top.as_slice(), dir.path(), &mut budget, true).expect_err("refused");
        assert!(error.to_string().contains("symlink"), "{error}");
        assert_eq!(fs::read(&victim).expect("still there"), b"keep");
    }

    #[test]
    fn whiteouts_remove_and_opaque_folders_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut budget = MAX_IMAGE_BYTES;
        let base = tar_of(&[("etc/keep", b"1"), ("etc/gone", b"2"), ("var/a/x", b"3"), ("var/a/y", b"4")]);
        apply_layer(base.as_slice(), dir.path(), &mut budget, true).expect("base");
        let top = tar_of(&[("etc/.wh.gone", b""), ("var/a/.wh..wh..opq", b""), ("var/a/z", b"5")]);
        apply_layer(top.as_slice(), dir.path(), &mut budget, true).expect("top");
        assert!(dir.path().join("etc/keep").exists());
        assert!(!dir.path().join("etc/gone").exists());
        let mut left: Vec<_> =
            fs::read_dir(dir.path().join("var/a")).expect("dir").map(|e| e.expect("e").file_name()).collect();
        left.sort();
        assert_eq!(left, ["z"]);
    }

    #[test]
    fn entries_cannot_leave_the_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut budget = MAX_IMAGE_BYTES;
        // A symlink out, then a file through it.
        let mut builder = tar::Builder::new(Vec::new());
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        link.set_cksum();
        builder.append_link(&mut link, "escape", "/tmp").expect("link");
        let mut file = tar::Header::new_gnu();
        file.set_size(1);
        file.set_cksum();
        builder.append_data(&mut file, "escape/hearth-image-escape", &b"x"[..]).expect("file");
        let bytes = builder.into_inner().expect("tar");
        assert!(apply_layer(bytes.as_slice(), dir.path(), &mut budget, true).is_err());
        assert!(!Path::new("/tmp/hearth-image-escape").exists());
        assert!(safe_join(dir.path(), Path::new("../x")).is_err());
    }
}
