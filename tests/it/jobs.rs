//! Jobs as a user runs them: `hearth run JOB.toml --local` under the real sandbox, WASI and native,
//! with byte-exact outputs, limits that end a job with a clear reason, and pause and resume of a
//! running job through the same runner the daemon uses.

use std::fs;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hearth::jobs::{Control, EVENT_BUFFER, Job, JobSpec, JobState, RunEvent, Runner};
use hearth_tests::hearth_bin;
use hearth_tests::jobs::{JobDir, probe_bin, wasm_module};
use tokio::sync::{mpsc, oneshot};

/// Bytes that are not text, so any transformation would show.
fn sample(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_u32;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

pub(crate) fn wasi_job_reads_an_input_and_writes_an_output() -> Result<()> {
    let job = JobDir::new()?;
    job.copy_in(&wasm_module("copy")?, "copy.wasm")?;
    let input = sample(1 << 20);
    job.file("data.bin", &input)?;
    let run = job.run(
        r#"
kind = "wasi"
module = "copy.wasm"
args = ["data.bin", "reversed.bin"]
env = { KEY = "value", EXIT_CODE = "7" }
inputs = ["data.bin"]
[resources]
cpu = 1.0
memory = "256MiB"
disk = "1GiB"
gpus = 0
[limits]
time = "60s"
network = false
"#,
    )?;
    run.expect_code(7)?;
    ensure!(run.stdout().contains("copied 1048576 bytes"), "stdout: {}", run.stdout());
    ensure!(run.stderr().contains("a note on stderr"), "stderr: {}", run.stderr());
    let mut expected = input;
    expected.reverse();
    ensure!(run.out("reversed.bin")? == expected, "the output is not the input reversed");
    ensure!(run.out("seen.txt")? == b"args=data.bin reversed.bin\nKEY=value\n");
    let logged = fs::read_to_string(run.job_dir()?.join("stdout.log"))?;
    ensure!(logged == "copied 1048576 bytes\n", "stdout.log: {logged:?}");
    Ok(())
}

pub(crate) fn native_job_reads_an_input_and_writes_an_output() -> Result<()> {
    let job = JobDir::new()?;
    let input = sample(300_000);
    job.file("data.bin", &input)?;
    fs::create_dir(job.path().join("folder"))?;
    job.file("folder/inner.txt", b"inside a folder\n")?;
    let run = job.run(
        r#"
kind = "native"
image = "base"
command = ["/bin/sh", "-c", "cat /in/data.bin /in/data.bin > /out/twice.bin && cp /in/folder/inner.txt /out/ && echo \"$KEY $1 $2 $(pwd)\" && exit 3", "sh"]
args = ["a", "b"]
env = { KEY = "value" }
inputs = ["data.bin", "folder"]
[resources]
cpu = 0.5
memory = "128MiB"
disk = "64MiB"
[limits]
time = "60s"
"#,
    )?;
    run.expect_code(3)?;
    ensure!(run.stdout() == "value a b /work\n", "stdout: {:?}", run.stdout());
    let twice = [input.as_slice(), input.as_slice()].concat();
    ensure!(run.out("twice.bin")? == twice, "the output is not the input twice");
    ensure!(run.out("inner.txt")? == b"inside a folder\n");
    // Scratch is gone after the run; outputs and logs stay.
    let dir = run.job_dir()?;
    for scratch in ["in", "scratch", "scratch.img", "root"] {
        ensure!(!dir.join(scratch).exists(), "{scratch} left behind");
    }
    Ok(())
}

pub(crate) fn malformed_spec_names_the_field_and_runs_nothing() -> Result<()> {
    let job = JobDir::new()?;
    let run = job.run(
        r#"
kind = "native"
image = "base"
command = ["/bin/sh", "-c", "echo ran > /out/ran"]
[resources]
memory = "lots"
[limits]
time = "60s"
"#,
    )?;
    run.expect_code(1)?;
    let stderr = run.stderr();
    ensure!(stderr.contains("resources.memory"), "the field is not named: {stderr}");
    ensure!(stderr.trim_end().lines().count() == 1, "not one line: {stderr}");
    ensure!(!job.data_dir().join("jobs").exists(), "a job folder was made for a spec that failed");
    Ok(())
}

pub(crate) fn wasi_time_limit_stops_a_spinning_module() -> Result<()> {
    let job = JobDir::new()?;
    job.copy_in(&wasm_module("spin")?, "spin.wasm")?;
    let started = Instant::now();
    let run = job.run(
        r#"
kind = "wasi"
module = "spin.wasm"
[resources]
memory = "64MiB"
[limits]
time = "2s"
"#,
    )?;
    run.expect_code(124)?;
    ensure!(run.stderr().contains("time limit of 2s exceeded"), "stderr: {}", run.stderr());
    ensure!(started.elapsed() < Duration::from_secs(20), "the limit was not enforced promptly");
    Ok(())
}

pub(crate) fn wasi_memory_limit_refuses_growth() -> Result<()> {
    let job = JobDir::new()?;
    job.copy_in(&wasm_module("balloon")?, "balloon.wasm")?;
    let run = job.run(
        r#"
kind = "wasi"
module = "balloon.wasm"
[resources]
memory = "32MiB"
[limits]
time = "60s"
"#,
    )?;
    // The module sees its allocation refused and says how far it got, under the limit.
    run.expect_code(3)?;
    let line = run.stdout();
    let mib: u64 = line
        .trim()
        .strip_prefix("allocation refused after ")
        .and_then(|rest| rest.strip_suffix(" MiB"))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("stdout: {line:?}"))?;
    ensure!((8..32).contains(&mib), "grew to {mib} MiB under a 32 MiB limit");
    Ok(())
}

pub(crate) fn a_module_that_is_not_wasm_fails_clearly() -> Result<()> {
    let job = JobDir::new()?;
    job.file("bad.wasm", b"this is not WebAssembly")?;
    let run = job.run("kind = \"wasi\"\nmodule = \"bad.wasm\"\n")?;
    run.expect_code(125)?;
    ensure!(run.stderr().contains("not a valid WebAssembly module"), "stderr: {}", run.stderr());
    Ok(())
}

/// Reads the eight per-thread counters the probe writes; `None` until all exist.
fn counters(out: &std::path::Path) -> Option<Vec<u64>> {
    (0..8).map(|i| fs::read_to_string(out.join(format!("t{i}"))).ok()?.trim().parse().ok()).collect()
}

pub(crate) fn pause_freezes_every_thread_and_resume_continues() -> Result<()> {
    let job = JobDir::new()?;
    job.copy_in(&probe_bin()?, "job-probe")?;
    let spec_path = job.file(
        "job.toml",
        br#"
kind = "native"
image = "base"
command = ["/in/job-probe", "threads", "8"]
inputs = ["job-probe"]
[resources]
cpu = 2.0
memory = "256MiB"
[limits]
time = "120s"
"#,
    )?;
    let spec = JobSpec::load(&spec_path)?;
    let runner =
        Runner::new(hearth_bin().to_owned(), job.data_dir().join("jobs"), job.data_dir().join("cache"));
    // Where the job's /out is while it runs.
    let out = runner.job_dir("pausing").join("scratch/out");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let (controls, control_rx) = mpsc::channel(4);
        let (events, mut event_rx) = mpsc::channel(EVENT_BUFFER);
        let request = Job { id: "pausing".into(), spec, gpus: Vec::new() };
        let run = tokio::spawn(async move { runner.run(request, control_rx, events).await });
        // Read as they come, as the supervisor does: a run waits for room in its event channel.
        let states = tokio::spawn(async move {
            let mut states = Vec::new();
            while let Some(event) = event_rx.recv().await {
                if let RunEvent::State(state) = event {
                    states.push(state.name());
                }
            }
            states
        });

        let until = Instant::now() + Duration::from_secs(30);
        while counters(&out).is_none() {
            ensure!(Instant::now() < until, "the threads never all started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut latencies = Vec::new();
        let cycles = async {
            for _ in 0..5 {
                let (reply, answer) = oneshot::channel();
                controls.send(Control::Pause(reply)).await?;
                latencies.push(answer.await??);
                // A thread frozen inside a system call (the rename of its counter file) may finish
                // that one call; after that nothing may move.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let frozen = counters(&out).context("counters")?;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let later = counters(&out);
                ensure!(
                    later == Some(frozen.clone()),
                    "a thread moved while paused: {frozen:?} -> {later:?}"
                );

                let (reply, answer) = oneshot::channel();
                controls.send(Control::Resume(reply)).await?;
                answer.await??;
                let until = Instant::now() + Duration::from_secs(10);
                loop {
                    let now = counters(&out).context("counters")?;
                    if now.iter().zip(&frozen).all(|(after, before)| after > before) {
                        break;
                    }
                    ensure!(Instant::now() < until, "not every thread continued: {frozen:?} -> {now:?}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        if let Err(error) = cycles {
            // Say how the job ended if it ended early: that is the real failure.
            run.abort();
            let ended = run.await;
            anyhow::bail!("{error:#} (the run: {ended:?})");
        }
        latencies.sort();
        eprintln!(
            "pause latency over {} freezes of 8 busy threads: min {:?}, max {:?}",
            latencies.len(),
            latencies[0],
            latencies[latencies.len() - 1]
        );

        controls.send(Control::Cancel).await?;
        let outcome = run.await?;
        ensure!(matches!(outcome.state, JobState::Cancelled { reason: None }), "{:?}", outcome.state);
        let states = states.await?;
        let expected = ["transferring", "running"]
            .into_iter()
            .chain(std::iter::repeat_n(["paused", "running"], 5).flatten())
            .chain(["cancelled"])
            .collect::<Vec<_>>();
        ensure!(states == expected, "states: {states:?}");
        Ok(())
    })
}

/// Copies `/bin/sh` and `/bin/cat` with the libraries they load into `root`: the smallest image
/// that runs a shell script, made from this host so no registry is needed.
pub(crate) fn minimal_rootfs(root: &std::path::Path) -> Result<()> {
    for program in ["/bin/sh", "/bin/cat"] {
        let ldd = std::process::Command::new("ldd").arg(program).output()?;
        let libraries: Vec<String> = String::from_utf8_lossy(&ldd.stdout)
            .split_whitespace()
            .filter(|word| word.starts_with('/'))
            .map(str::to_owned)
            .collect();
        for file in libraries.iter().map(String::as_str).chain([program]) {
            let target = root.join(file.trim_start_matches('/'));
            fs::create_dir_all(target.parent().context("parent")?)?;
            fs::copy(file, &target).with_context(|| format!("copying {file}"))?;
        }
    }
    Ok(())
}

pub(crate) fn tar_dir(dir: &std::path::Path, archive: &std::path::Path) -> Result<()> {
    let status =
        std::process::Command::new("tar").arg("-C").arg(dir).arg("-cf").arg(archive).arg(".").status()?;
    ensure!(status.success(), "tar failed");
    Ok(())
}

/// The SHA-256 of a file, as hex.
pub(crate) fn sha256_of(path: &std::path::Path) -> Result<String> {
    let out = std::process::Command::new("sha256sum").arg(path).output()?;
    let text = String::from_utf8(out.stdout)?;
    Ok(text.split_whitespace().next().context("no sum")?.to_owned())
}

const IMAGE_SCRIPT: &str = "cat /etc/hello; [ -e /etc/gone ] || echo gone; [ -e /usr/bin ] || echo no-usr; cat /in/data.txt > /out/copy";

fn image_spec(image: &str) -> String {
    format!(
        "kind = \"native\"\nimage = \"{image}\"\ncommand = [\"/bin/sh\", \"-c\", \"{IMAGE_SCRIPT}\"]\n\
         inputs = [\"data.txt\"]\n[limits]\ntime = \"60s\"\n"
    )
}

pub(crate) fn native_job_runs_in_a_rootfs_tar() -> Result<()> {
    let job = JobDir::new()?;
    let root = job.path().join("rootfs");
    minimal_rootfs(&root)?;
    fs::create_dir_all(root.join("etc"))?;
    fs::write(root.join("etc/hello"), "from the tar\n")?;
    tar_dir(&root, &job.path().join("rootfs.tar"))?;
    job.file("data.txt", b"input bytes")?;
    let run = job.run(&image_spec("rootfs.tar"))?;
    run.expect_code(0)?;
    ensure!(run.stdout() == "from the tar\ngone\nno-usr\n", "stdout: {:?}", run.stdout());
    ensure!(run.out("copy")? == b"input bytes");
    // Unpacked once, under the archive's digest.
    let images = job.data_dir().join("cache/images");
    let cached: Vec<_> = fs::read_dir(&images)?.filter_map(|e| e.ok()).collect();
    ensure!(cached.len() == 1, "cache: {cached:?}");
    ensure!(cached[0].file_name().to_string_lossy() == sha256_of(&job.path().join("rootfs.tar"))?);
    Ok(())
}

pub(crate) fn native_job_runs_in_an_oci_image_with_whiteouts() -> Result<()> {
    let job = JobDir::new()?;
    // Layer one: the shell, /etc/hello = one, /etc/gone. Layer two (gzipped): hello = two, and a
    // whiteout for gone.
    let one = job.path().join("one");
    minimal_rootfs(&one)?;
    fs::create_dir_all(one.join("etc"))?;
    fs::write(one.join("etc/hello"), "one\n")?;
    fs::write(one.join("etc/gone"), "should be hidden\n")?;
    let two = job.path().join("two");
    fs::create_dir_all(two.join("etc"))?;
    fs::write(two.join("etc/hello"), "two\n")?;
    fs::write(two.join("etc/.wh.gone"), "")?;
    let config = "{\"os\":\"linux\"}";
    crate::images::oci_archive(job.path(), &[&one, &two], config, &job.path().join("image.tar"))?;
    job.file("data.txt", b"input bytes")?;

    let run = job.run(&image_spec("image.tar"))?;
    run.expect_code(0)?;
    ensure!(run.stdout() == "two\ngone\nno-usr\n", "stdout: {:?}", run.stdout());
    ensure!(run.out("copy")? == b"input bytes");
    Ok(())
}

/// The UUID of each GPU `nvidia-smi -L` lists on the host, in its order.
fn host_gpu_uuids() -> Result<Vec<String>> {
    let out = std::process::Command::new("nvidia-smi").arg("-L").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|line| Some(line.split("(UUID: ").nth(1)?.trim_end_matches(')').to_owned()))
        .collect())
}

pub(crate) fn a_granted_gpu_is_the_only_one_the_job_sees() -> Result<()> {
    let host = host_gpu_uuids()?;
    ensure!(!host.is_empty(), "nvidia-smi -L listed no GPU");
    let job = JobDir::new()?;
    // The driver's own nvidia-smi, bound from the host, through the PATH the grant sets.
    let run = job.run(
        "kind = \"native\"\nimage = \"base\"\ncommand = [\"/bin/sh\", \"-c\", \
         \"nvidia-smi -L; echo PATH=$PATH; ls /dev | grep nvidia\"]\n\
         [resources]\ngpus = 1\n[limits]\ntime = \"60s\"\n",
    )?;
    run.expect_code(0)?;
    let out = run.stdout();
    let seen: Vec<&str> = out.lines().filter(|line| line.starts_with("GPU ")).collect();
    ensure!(seen.len() == 1, "the job saw {} GPUs:\n{out}", seen.len());
    ensure!(host.iter().any(|uuid| seen[0].contains(uuid.as_str())), "not a host GPU:\n{out}");
    ensure!(out.contains("PATH=/.hearth/nvidia/bin:"), "{out}");
    let nodes: Vec<&str> = out.lines().filter(|line| line.starts_with("nvidia")).collect();
    let gpu_nodes = nodes.iter().filter(|n| n.trim_start_matches("nvidia").parse::<u32>().is_ok()).count();
    ensure!(gpu_nodes == 1, "the job has {gpu_nodes} GPU device nodes: {nodes:?}");

    let job = JobDir::new()?;
    let run = job.run(
        "kind = \"native\"\nimage = \"base\"\ncommand = [\"/bin/sh\", \"-c\", \
         \"ls /dev | grep nvidia; ls /.hearth 2>&1; nvidia-smi -L; exit 0\"]\n",
    )?;
    run.expect_code(0)?;
    let out = run.stdout();
    ensure!(
        !out.lines().any(|line| line.starts_with("nvidia")),
        "a job without a grant has NVIDIA nodes:\n{out}"
    );
    ensure!(!out.contains("GPU 0"), "a job without a grant sees a GPU:\n{out}");
    Ok(())
}
