//! Native job images: an OCI image archive (as `docker save` or `skopeo copy … oci-archive:` write
//! it) or a plain rootfs tar, unpacked once into a cache keyed by the archive's SHA-256.
//!
//! The archive is untrusted. Entries are unpacked with the `tar` crate's `unpack_in`, which refuses
//! absolute paths, `..` and writes through symlinks that leave the destination; device nodes and
//! fifos are skipped (a job's `/dev` is the sandbox's own); the total size is bounded. OCI layers
//! are applied in order with their whiteouts (`.wh.NAME` removes NAME, `.wh..wh..opq` empties a
//! folder). An unpacked image is renamed into place only when complete, so a crash or a bad archive
//! never leaves a half image in the cache; the sandbox mounts it read-only.

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};
use hearth_api::local_file;
use serde::Deserialize;

/// The most bytes an image may unpack to.
pub const MAX_IMAGE_BYTES: u64 = 32 << 30;

/// Unpacks `archive` into `cache_dir` unless already there, and returns the root filesystem folder.
pub fn unpack_cached(archive: &Path, cache_dir: &Path) -> anyhow::Result<PathBuf> {
    // A regular file only: a device or a named pipe would be read (or waited on) for ever.
    let file = local_file::open_regular(archive, MAX_IMAGE_BYTES, "image")?;
    let digest = sha256_of(file).with_context(|| format!("reading image {}", local_file::shown(archive)))?;
    let image_dir = cache_dir.join(&digest);
    let rootfs = image_dir.join("rootfs");
    if rootfs.is_dir() {
        return Ok(rootfs);
    }
    fs::create_dir_all(cache_dir).with_context(|| format!("creating {}", cache_dir.display()))?;
    // A staging folder of its own per unpack (removed on drop unless kept), so two jobs with the
    // same image never share or delete each other's half-made tree.
    let staging = tempfile::Builder::new().prefix(".unpack-").tempdir_in(cache_dir)?;
    unpack(archive, staging.path()).with_context(|| format!("unpacking image {}", archive.display()))?;
    match fs::rename(staging.path(), &image_dir) {
        Ok(()) => {
            // Renamed away: there is nothing left for the guard to remove.
            let _ = staging.keep();
        }
        // Another run unpacked the same archive meanwhile; theirs is as good as ours.
        Err(_) if rootfs.is_dir() => {}
        Err(error) => return Err(error).context("moving the unpacked image into the cache"),
    }
    Ok(rootfs)
}

/// Unpacks into `staging/rootfs`, using `staging/archive` for an OCI archive's blobs.
fn unpack(archive: &Path, staging: &Path) -> anyhow::Result<()> {
    let rootfs = staging.join("rootfs");
    fs::create_dir(&rootfs)?;
    let mut budget = MAX_IMAGE_BYTES;
    let outer = staging.join("archive");
    fs::create_dir(&outer)?;
    apply_layer(open_maybe_gzip(archive)?, &outer, &mut budget, false)?;
    let layers = if outer.join("oci-layout").is_file() && outer.join("index.json").is_file() {
        oci_layers(&outer)?
    } else if outer.join("manifest.json").is_file() {
        docker_layers(&outer)?
    } else {
        // A plain rootfs tar: what was unpacked is the image.
        fs::remove_dir(&rootfs)?;
        fs::rename(&outer, &rootfs)?;
        return Ok(());
    };
    let mut budget = MAX_IMAGE_BYTES;
    for layer in layers {
        apply_layer(open_maybe_gzip(&layer)?, &rootfs, &mut budget, true)
            .with_context(|| format!("applying layer {}", layer.display()))?;
    }
    fs::remove_dir_all(&outer)?;
    Ok(())
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
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
    layers: Vec<Descriptor>,
}

/// The layer files of an OCI image layout, base first. A multi-platform index is narrowed to
/// this machine's architecture.
fn oci_layers(layout: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let blob = |digest: &str| -> anyhow::Result<PathBuf> {
        let (algorithm, hex) = digest.split_once(':').context("a digest without an algorithm")?;
        if algorithm != "sha256" || hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("unsupported digest {digest:?}");
        }
        regular_file_beneath(layout, &Path::new("blobs/sha256").join(hex))
    };
    let read_json = |path: &Path| -> anyhow::Result<serde_json::Value> {
        let text = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    };
    let mut index: Index = serde_json::from_value(read_json(&layout.join("index.json"))?)?;
    // An index may point at another index (one per platform); follow at most a few levels.
    for _ in 0..4 {
        let chosen = pick_platform(&index.manifests).context("the image index lists no manifest")?;
        let value = read_json(&blob(&chosen.digest)?)?;
        if chosen.media_type.contains("index") || value.get("manifests").is_some() {
            index = serde_json::from_value(value)?;
            continue;
        }
        let manifest: Manifest = serde_json::from_value(value).context("reading the image manifest")?;
        return manifest.layers.iter().map(|layer| blob(&layer.digest)).collect();
    }
    bail!("image indexes nest too deeply")
}

fn pick_platform(manifests: &[Descriptor]) -> Option<&Descriptor> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    manifests
        .iter()
        .find(|m| m.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == arch))
        .or_else(|| manifests.iter().find(|m| m.platform.is_none()))
        .or_else(|| manifests.first())
}

/// The layer files of a `docker save` archive, base first.
fn docker_layers(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    #[derive(Deserialize)]
    struct Entry {
        #[serde(rename = "Layers")]
        layers: Vec<String>,
    }
    let text = fs::read(dir.join("manifest.json"))?;
    let entries: Vec<Entry> = serde_json::from_slice(&text).context("parsing manifest.json")?;
    let entry = entries.first().context("manifest.json lists no image")?;
    entry.layers.iter().map(|layer| regular_file_beneath(dir, Path::new(layer))).collect()
}

/// Opens a tar that may be gzip-compressed.
fn open_maybe_gzip(path: &Path) -> anyhow::Result<Box<dyn Read>> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut magic = [0u8; 2];
    let gzip = file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
    file.seek(SeekFrom::Start(0))?;
    let reader = BufReader::new(file);
    Ok(if gzip { Box::new(flate2::read::GzDecoder::new(reader)) } else { Box::new(reader) })
}

/// Unpacks one tar into `dest`, honouring whiteouts when `whiteouts` is set.
fn apply_layer(reader: impl Read, dest: &Path, budget: &mut u64, whiteouts: bool) -> anyhow::Result<()> {
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
        *budget = budget.checked_sub(size).context("the image is larger than 32 GiB unpacked")?;
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
