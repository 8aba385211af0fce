//! Native jobs in image archives as `docker save` and `skopeo` write them, run with `hearth run
//! --local` and as market jobs: the image's config fills in what the spec leaves out, the unpacked
//! image is reused by the next job (and a provider receives it once), and an archive whose blobs
//! do not match their digests runs nothing.

use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hearth::jobs::{Image, JobKind, JobSpec};
use hearth_tests::jobs::JobDir;
use hearth_tests::{Agent, eventually, json_of};
use serde_json::Value;

use crate::jobs::{minimal_rootfs, sha256_of, tar_dir};
use crate::network::consumer_and_provider;

/// Moves `file` into `blobs` under its digest and returns its descriptor.
fn add_blob(blobs: &Path, file: &Path, media_type: &str) -> Result<String> {
    let digest = sha256_of(file)?;
    let size = fs::metadata(file)?.len();
    fs::rename(file, blobs.join(&digest))?;
    Ok(format!("{{\"mediaType\":\"{media_type}\",\"digest\":\"sha256:{digest}\",\"size\":{size}}}"))
}

/// Writes an OCI image archive, as `skopeo copy … oci-archive:` makes one, at `archive`: one layer
/// per folder of `layers` (base first; every layer after the first gzipped, as registries keep
/// them) and `config` as the image config. `scratch` is a folder it may work in.
pub(crate) fn oci_archive(scratch: &Path, layers: &[&Path], config: &str, archive: &Path) -> Result<()> {
    let layout = scratch.join("layout");
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let mut descriptors = Vec::new();
    for (i, dir) in layers.iter().enumerate() {
        let tar = scratch.join("layer.tar");
        tar_dir(dir, &tar)?;
        let (file, media) = if i > 0 {
            ensure!(
                std::process::Command::new("gzip").arg("-f").arg(&tar).status()?.success(),
                "gzip failed"
            );
            (scratch.join("layer.tar.gz"), "tar+gzip")
        } else {
            (tar, "tar")
        };
        descriptors.push(add_blob(&blobs, &file, &format!("application/vnd.oci.image.layer.v1.{media}"))?);
    }
    fs::write(scratch.join("config"), config)?;
    let config = add_blob(&blobs, &scratch.join("config"), "application/vnd.oci.image.config.v1+json")?;
    let manifest = format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\
         \"config\":{config},\"layers\":[{}]}}",
        descriptors.join(",")
    );
    fs::write(scratch.join("manifest"), manifest)?;
    let manifest = add_blob(&blobs, &scratch.join("manifest"), "application/vnd.oci.image.manifest.v1+json")?;
    fs::write(layout.join("index.json"), format!("{{\"schemaVersion\":2,\"manifests\":[{manifest}]}}"))?;
    fs::write(layout.join("oci-layout"), "{\"imageLayoutVersion\":\"1.0.0\"}")?;
    tar_dir(&layout, archive)?;
    fs::remove_dir_all(&layout)?;
    Ok(())
}

/// The config of the test image: a `PATH` of its own, a variable the spec overrides, and a
/// program that says where it runs and with what.
const CONFIG: &str = r#"{"os":"linux","config":{
    "Env":["PATH=/app/bin:/bin","GREETING=hello","MOOD=image"],
    "WorkingDir":"/app","Entrypoint":["/bin/sh","/app/start.sh"],"Cmd":["from-cmd"]}}"#;

const START: &str = "echo \"$GREETING from $(pwd) with $*\"; echo \"PATH=$PATH MOOD=$MOOD\"\n";

pub(crate) fn native_job_takes_what_its_spec_leaves_from_the_image_config() -> Result<()> {
    let job = JobDir::new()?;
    let root = job.path().join("rootfs");
    minimal_rootfs(&root)?;
    fs::create_dir_all(root.join("app"))?;
    fs::write(root.join("app/start.sh"), START)?;
    oci_archive(job.path(), &[&root], CONFIG, &job.path().join("image.tar"))?;

    // No command: the image's Entrypoint and Cmd run in its WorkingDir, with its Env under the
    // spec's.
    let image_only =
        "kind = \"native\"\nimage = \"image.tar\"\n[env]\nMOOD = \"spec\"\n[limits]\ntime = \"60s\"\n";
    let run = job.run(image_only)?;
    run.expect_code(0)?;
    ensure!(
        run.stdout() == "hello from /app with from-cmd\nPATH=/app/bin:/bin MOOD=spec\n",
        "stdout: {:?}",
        run.stdout()
    );

    // The unpacked image is in the cache once; mark it, and the next job must see the mark: it
    // was not unpacked again.
    let images = job.data_dir().join("cache/images");
    let cached: Vec<_> = fs::read_dir(&images)?.filter_map(|entry| entry.ok()).collect();
    ensure!(cached.len() == 1, "cache: {cached:?}");
    ensure!(cached[0].file_name().to_string_lossy() == sha256_of(&job.path().join("image.tar"))?);
    fs::write(cached[0].path().join("rootfs/app/mark"), "reused\n")?;

    // The spec's own command runs in /work, with the spec's arguments after it; the image's Env
    // still applies.
    let own = "kind = \"native\"\nimage = \"image.tar\"\n\
               command = [\"/bin/sh\", \"-c\", \"pwd; cat /app/mark; echo $GREETING $0\"]\n\
               args = [\"arg\"]\n[limits]\ntime = \"60s\"\n";
    let run = job.run(own)?;
    run.expect_code(0)?;
    ensure!(run.stdout() == "/work\nreused\nhello arg\n", "stdout: {:?}", run.stdout());
    Ok(())
}

pub(crate) fn an_image_whose_layer_does_not_match_its_digest_runs_nothing() -> Result<()> {
    let job = JobDir::new()?;
    let root = job.path().join("rootfs");
    minimal_rootfs(&root)?;
    fs::create_dir_all(root.join("app"))?;
    fs::write(root.join("app/start.sh"), START)?;
    let archive = job.path().join("image.tar");
    oci_archive(job.path(), &[&root], CONFIG, &archive)?;
    // Swap the layer's bytes for others of the same size under the same name.
    let unpacked = job.path().join("unpacked");
    fs::create_dir(&unpacked)?;
    let status =
        std::process::Command::new("tar").arg("-C").arg(&unpacked).arg("-xf").arg(&archive).status()?;
    ensure!(status.success(), "tar failed");
    let mut largest = None;
    for entry in fs::read_dir(unpacked.join("blobs/sha256"))? {
        let path = entry?.path();
        let size = fs::metadata(&path)?.len();
        if largest.as_ref().is_none_or(|(_, most)| size > *most) {
            largest = Some((path, size));
        }
    }
    let (layer, _) = largest.context("no blob")?;
    let mut bytes = fs::read(&layer)?;
    let start =
        bytes.windows(START.len()).position(|w| w == START.as_bytes()).context("script not in the layer")?;
    bytes[start] = b'#';
    fs::write(&layer, bytes)?;
    tar_dir(&unpacked, &archive)?;

    let run =
        job.run("kind = \"native\"\nimage = \"image.tar\"\ncommand = [\"/bin/sh\", \"-c\", \"echo ran\"]\n")?;
    run.expect_code(125)?;
    ensure!(!run.stdout().contains("ran"), "stdout: {}", run.stdout());
    ensure!(run.stderr().contains("does not match its digest"), "stderr: {}", run.stderr());
    let images = job.data_dir().join("cache/images");
    let left: Vec<_> = fs::read_dir(&images)?.filter_map(|entry| entry.ok()).collect();
    ensure!(left.is_empty(), "the refused image left {left:?} in the cache");
    Ok(())
}

/// `examples/pytorch-gpu/job.toml` is a valid spec once its archive is made next to it.
pub(crate) fn the_pytorch_example_is_a_valid_spec() -> Result<()> {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pytorch-gpu");
    let job = JobDir::new()?;
    for name in ["job.toml", "train.py"] {
        job.copy_in(&example.join(name), name)?;
    }
    // Any file will do for the parser; the real one is gigabytes.
    job.file("pytorch.tar", b"")?;
    let spec = JobSpec::load(&job.path().join("job.toml"))?;
    let JobKind::Native { image: Image::Archive(archive), command } = &spec.kind else {
        anyhow::bail!("not a native job in an image archive: {:?}", spec.kind);
    };
    ensure!(archive.ends_with("pytorch.tar"), "{}", archive.display());
    ensure!(command.as_deref().is_some_and(|c| c.first().is_some_and(|p| p == "python")), "{command:?}");
    ensure!(spec.resources.gpus == 1, "{:?}", spec.resources);
    ensure!(spec.inputs.iter().any(|input| input.ends_with("train.py")), "{:?}", spec.inputs);
    Ok(())
}

/// The remote job `id` once it has ended, as the consumer lists it.
fn ended(consumer: &Agent, provider: &Agent, id: &str) -> Result<Value> {
    eventually(Duration::from_secs(120), &format!("job {id} to end"), || {
        let jobs = json_of(&consumer.cli(&["jobs", "--json"])?)?;
        let job = jobs.as_array().and_then(|all| all.iter().find(|job| job["id"] == id).cloned());
        Ok(job.filter(|job| matches!(job["state"].as_str(), Some("finished" | "failed" | "cancelled"))))
    })
    .with_context(|| format!("--- provider log ---\n{}", provider.log()))
}

pub(crate) fn a_provider_receives_and_unpacks_an_image_once() -> Result<()> {
    let (consumer, provider) = consumer_and_provider()?;
    let work = JobDir::new()?;
    let root = work.path().join("rootfs");
    minimal_rootfs(&root)?;
    fs::create_dir_all(root.join("app"))?;
    // The image's program also shows a mark the test leaves in the provider's unpacked copy.
    fs::write(root.join("app/start.sh"), format!("{START}cat /app/mark 2>/dev/null; exit 0\n"))?;
    let archive = work.path().join("image.tar");
    oci_archive(work.path(), &[&root], CONFIG, &archive)?;
    let spec = work.file(
        "job.toml",
        b"kind = \"native\"\nimage = \"image.tar\"\nmax_price = 50\n\
          [resources]\ncpu = 0.5\nmemory = \"64MiB\"\n[limits]\ntime = \"60s\"\n",
    )?;
    let images = provider.data_dir().join("cache/images");
    for (round, mark) in [(1, ""), (2, "reused\n")] {
        let output = consumer.cli(&["submit", spec.to_str().context("path")?])?;
        ensure!(output.status.success(), "submit: {}", String::from_utf8_lossy(&output.stderr));
        let id = String::from_utf8(output.stdout)?.lines().next().context("no id")?.trim().to_owned();
        let job = ended(&consumer, &provider, &id)?;
        ensure!(job["state"] == "finished" && job["exit_code"] == 0, "job {round}: {job}");
        let logs = String::from_utf8(consumer.cli(&["job", "logs", &id])?.stdout)?;
        let expected = format!("hello from /app with from-cmd\nPATH=/app/bin:/bin MOOD=image\n{mark}");
        ensure!(logs == expected, "job {round} printed {logs:?}");
        // One unpacked copy, which the second job found with the mark in it.
        let cached: Vec<_> = fs::read_dir(&images)?.filter_map(|entry| entry.ok()).collect();
        ensure!(cached.len() == 1, "the provider's image cache after job {round}: {cached:?}");
        fs::write(cached[0].path().join("rootfs/app/mark"), "reused\n")?;
    }
    // Both jobs fetched the archive; the second found it in the blob store, so nothing came over
    // the network.
    let size = fs::metadata(&archive)?.len();
    let fetches = json_of(&provider.cli(&["transfers", "--json"])?)?;
    let fetches = fetches.as_array().context("fetches")?;
    let sent = |fetch: &&Value| fetch["bytes_received"].as_u64() == Some(size);
    let kept = |fetch: &&Value| fetch["bytes_received"] == 0 && fetch["resumed_from"].as_u64() == Some(size);
    ensure!(
        fetches.len() == 2
            && fetches.iter().filter(sent).count() == 1
            && fetches.iter().filter(kept).count() == 1,
        "the provider's fetches of a {size}-byte archive: {fetches:?}"
    );
    Ok(())
}
