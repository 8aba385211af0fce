//! Specs and their files sent by content: a job submitted from a folder the daemon never sees
//! (removed as soon as the submission is answered) runs, here and on another agent; hostile
//! uploads are refused with the API's error body and leave nothing behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hearth_api::Client;
use hearth_tests::jobs::wasm_module;
use hearth_tests::{Agent, json_of, pseudo_random};
use serde_json::Value;

use crate::network::{address, joining, wait_to_know};

/// A spec for `copy.wasm`, reversing `/in/<input>` into `/out/reversed.bin`.
fn copy_spec(input: &str, inputs: &str) -> String {
    format!(
        "kind = \"wasi\"\nmodule = \"copy.wasm\"\nargs = [\"{input}\", \"reversed.bin\"]\n\
         inputs = [\"{inputs}\"]\n[resources]\nmemory = \"64MiB\"\n[limits]\ntime = \"120s\"\n"
    )
}

/// The typed client of `agent`, as the CLI and the desktop shell use it.
fn client(agent: &Agent) -> Result<Client> {
    Ok(Client::discover(&agent.data_dir())?)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// What is left in the agent's staging folder.
fn staged(agent: &Agent) -> Vec<PathBuf> {
    fs::read_dir(agent.data_dir().join("uploads"))
        .map(|entries| entries.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default()
}

/// Waits (bounded) until `check` holds; `describe` says what was awaited.
fn wait_until(within: Duration, mut check: impl FnMut() -> Result<bool>, describe: &str) -> Result<()> {
    hearth_tests::eventually(within, describe, || Ok(check()?.then_some(())))
}

/// The job `id` as `hearth jobs --json` on `agent` lists it, once `done` holds.
fn wait_job(agent: &Agent, id: &str, done: impl Fn(&Value) -> bool) -> Result<Value> {
    let mut last = Value::Null;
    wait_until(
        Duration::from_secs(120),
        || {
            let jobs = json_of(&agent.cli(&["jobs", "--json"])?)?;
            last = jobs
                .as_array()
                .and_then(|all| all.iter().find(|j| j["id"] == id).cloned())
                .unwrap_or_default();
            Ok(done(&last))
        },
        &format!("job {id} never got there\n--- agent log ---\n{}", agent.log()),
    )?;
    Ok(last)
}

/// A working folder with the module, a folder input `data/` and the spec; the data's bytes.
fn workdir(dir: &Path, spec: &str) -> Result<Vec<u8>> {
    fs::copy(wasm_module("copy")?, dir.join("copy.wasm"))?;
    fs::create_dir_all(dir.join("data/deep"))?;
    // Over the API's 2 MiB limit for JSON bodies, which upload routes lift.
    let data = pseudo_random(3 << 20, 21);
    fs::write(dir.join("data/deep/data.bin"), &data)?;
    fs::write(dir.join("data/other.txt"), b"sent along")?;
    fs::create_dir(dir.join("data/empty"))?;
    fs::write(dir.join("job.toml"), spec)?;
    Ok(data)
}

pub(crate) fn a_job_from_a_folder_the_daemon_cannot_see_runs() -> Result<()> {
    let agent = Agent::start()?;
    let work = tempfile::tempdir()?;
    let data = workdir(work.path(), &copy_spec("data/deep/data.bin", "data"))?;
    let spec = work.path().join("job.toml");
    let job = runtime()?.block_on(client(&agent)?.submit(&spec))?;
    // The daemon has all it needs once it answered: the working folder goes at once.
    work.close()?;

    let done = wait_job(&agent, &job.id, |j| j["state"] == "finished" || j["state"] == "failed")?;
    ensure!(done["state"] == "finished" && done["exit_code"] == 0, "{done}\n{}", agent.log());
    let out = PathBuf::from(done["job_dir"].as_str().context("job_dir")?).join("out");
    let mut reversed = data;
    reversed.reverse();
    ensure!(fs::read(out.join("reversed.bin"))? == reversed, "the job did not read the uploaded input");
    // The staged files are removed once the job has ended.
    wait_until(Duration::from_secs(10), || Ok(staged(&agent).is_empty()), "the upload was left behind")?;
    Ok(())
}

pub(crate) fn a_remote_job_from_a_folder_the_daemon_cannot_see_runs() -> Result<()> {
    let consumer = Agent::start()?;
    let (bootstrap, _) = address(&consumer)?;
    let provider = joining(&bootstrap)?;
    let (_, provider_id) = address(&provider)?;
    wait_to_know(&consumer, &[&provider_id], Duration::from_secs(30))?;

    let work = tempfile::tempdir()?;
    let data = workdir(work.path(), &copy_spec("data/deep/data.bin", "data"))?;
    let spec = work.path().join("job.toml");
    let job = runtime()?.block_on(client(&consumer)?.submit_remote(&spec))?;
    work.close()?;
    // A remote job's files are in the blob store once it is accepted; nothing stays staged.
    ensure!(staged(&consumer).is_empty(), "staged files were left: {:?}", staged(&consumer));

    let done = wait_job(&consumer, &job.id, |j| j["state"] == "finished" || j["state"] == "failed")?;
    ensure!(done["state"] == "finished" && done["exit_code"] == 0, "{done}\n{}", consumer.log());
    ensure!(done["provider"] == provider_id.as_str(), "{done}");
    let results = tempfile::tempdir()?;
    let out = results.path().join("results");
    let got = consumer.cli(&["results", &job.id, "--out", out.to_str().context("path")?])?;
    ensure!(got.status.success(), "results: {}", String::from_utf8_lossy(&got.stderr));
    let mut reversed = data;
    reversed.reverse();
    ensure!(fs::read(out.join("reversed.bin"))? == reversed, "the output did not come back byte-identical");
    Ok(())
}

/// One multipart part of a hand-made upload.
enum Piece {
    Text(&'static str, String),
    File(String, Vec<u8>),
}

/// Sends a hand-made upload to `route` on `agent`, as any HTTP client could; the status and the
/// body.
fn post(agent: &Agent, route: &str, pieces: Vec<Piece>) -> Result<(u16, Value)> {
    let url = format!("http://127.0.0.1:{}{route}", agent.port()?);
    let token = agent.token()?;
    runtime()?.block_on(async {
        let mut form = reqwest::multipart::Form::new();
        for piece in pieces {
            form = match piece {
                Piece::Text(name, text) => form.text(name, text),
                Piece::File(name, bytes) => {
                    form.part("file", reqwest::multipart::Part::bytes(bytes).file_name(name))
                }
            };
        }
        let response = reqwest::Client::builder()
            .no_proxy()
            .build()?
            .post(url)
            .bearer_auth(token)
            .multipart(form)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    })
}

pub(crate) fn a_package_keeps_its_upload_until_it_ends_and_a_restart_sweeps_strays() -> Result<()> {
    let mut agent = Agent::start()?;
    let work = tempfile::tempdir()?;
    workdir(work.path(), &copy_spec("data/deep/data.bin", "data"))?;
    // No provider is known: the request is recorded, then rolled back after its one try.
    let package =
        "retries = 0\n[resources.a]\nmemory = \"64MiB\"\n[[tasks]]\nresource = \"a\"\nspec = \"job.toml\"\n";
    fs::write(work.path().join("package.toml"), package)?;
    let request = runtime()?.block_on(client(&agent)?.submit_package(&work.path().join("package.toml")))?;
    work.close()?;
    let mut last = Value::Null;
    wait_until(
        Duration::from_secs(60),
        || {
            last = json_of(&agent.cli(&["request", "status", &request.id, "--json"])?)?;
            Ok(last["state"] == "rolled_back")
        },
        "the request never ended",
    )?;
    ensure!(last["task_list"][0]["state"] == "skipped", "{last}");
    // Nothing will read its task specs again: the uploaded files go.
    wait_until(Duration::from_secs(10), || Ok(staged(&agent).is_empty()), "the package's upload was left")?;

    // A staging folder left by a crash mid-upload is swept at the next start.
    let stray = agent.data_dir().join("uploads/0123456789ab/files");
    fs::create_dir_all(&stray)?;
    fs::write(stray.join("half.bin"), b"half an upload")?;
    ensure!(agent.terminate()?.success());
    agent.restart()?;
    ensure!(staged(&agent).is_empty(), "a stray upload survived the restart: {:?}", staged(&agent));
    Ok(())
}

/// Sends a JSON body to `route` on `agent`; the status and the body.
fn post_json(agent: &Agent, route: &str, json: &Value) -> Result<(u16, Value)> {
    let url = format!("http://127.0.0.1:{}{route}", agent.port()?);
    let token = agent.token()?;
    runtime()?.block_on(async {
        let client = reqwest::Client::builder().no_proxy().build()?;
        let response = client.post(url).bearer_auth(token).json(json).send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    })
}

pub(crate) fn hostile_uploads_are_refused_and_leave_nothing() -> Result<()> {
    let agent = Agent::start_with_config(
        "[api]\nport = 0\nupload_max_file_bytes = 4096\nupload_max_bytes = 6000\nupload_max_files = 4\n",
    )?;
    let module = fs::read(wasm_module("copy")?)?;
    let spec =
        |module: &str, input: &str| Piece::Text("spec", copy_spec("x", input).replace("copy.wasm", module));
    let small = || Piece::File("m.wasm".into(), b"\0asm\x01\0\0\0".to_vec());
    let cases: Vec<(&str, Vec<Piece>, u16, &str)> = vec![
        (
            "a name climbing out",
            vec![spec("m.wasm", "m.wasm"), small(), Piece::File("../escape.txt".into(), b"x".to_vec())],
            400,
            "invalid_upload_name",
        ),
        (
            "an absolute name",
            vec![
                spec("m.wasm", "m.wasm"),
                small(),
                Piece::File("/tmp/hearth-escape.txt".into(), b"x".to_vec()),
            ],
            400,
            "invalid_upload_name",
        ),
        (
            "a file over the file limit",
            vec![spec("copy.wasm", "copy.wasm"), Piece::File("copy.wasm".into(), module)],
            413,
            "upload_too_large",
        ),
        (
            "files over the upload's limit",
            vec![
                spec("m.wasm", "a"),
                small(),
                Piece::File("a".into(), vec![1; 4000]),
                Piece::File("b".into(), vec![2; 4000]),
            ],
            413,
            "upload_too_large",
        ),
        (
            "too many parts",
            (0..5).map(|i| Piece::File(format!("f{i}"), b"x".to_vec())).chain([spec("f0", "f1")]).collect(),
            413,
            "upload_too_large",
        ),
        ("a spec naming a file not sent", vec![spec("m.wasm", "gone.txt"), small()], 400, "missing_upload"),
        ("a spec naming a daemon path", vec![spec("m.wasm", "/etc/passwd"), small()], 400, "invalid_upload"),
        ("a spec climbing out", vec![spec("../../../etc/passwd", "m.wasm"), small()], 400, "invalid_upload"),
        ("the same name twice", vec![spec("m.wasm", "m.wasm"), small(), small()], 400, "invalid_upload_name"),
        ("no spec", vec![small()], 400, "invalid_upload"),
    ];
    let attempts = cases.len();
    for (what, pieces, status, code) in cases {
        for route in ["/api/v1/jobs", "/api/v1/remote-jobs"] {
            let pieces = pieces
                .iter()
                .map(|piece| match piece {
                    Piece::Text(name, text) => Piece::Text(name, text.clone()),
                    Piece::File(name, bytes) => Piece::File(name.clone(), bytes.clone()),
                })
                .collect();
            let (got, body) = post(&agent, route, pieces)?;
            ensure!(got == status, "{what} to {route}: {got} {body}");
            ensure!(
                body["code"] == code && body["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{what}: {body}"
            );
            ensure!(staged(&agent).is_empty(), "{what} to {route} left {:?}", staged(&agent));
        }
    }
    // The old form, a path on the daemon's machine, is refused with the API's error body.
    for route in
        ["/api/v1/jobs", "/api/v1/remote-jobs", "/api/v1/requests", "/api/v1/packages", "/api/v1/blobs"]
    {
        let (got, body) =
            post_json(&agent, route, &serde_json::json!({ "spec": "/etc/passwd", "path": "/etc" }))?;
        ensure!(got == 400 && body["code"] == "invalid_upload", "a path sent to {route}: {got} {body}");
    }
    // A package naming a task spec that was not sent.
    let package = "[resources.a]\n[[tasks]]\nresource = \"a\"\nspec = \"task.toml\"\n".to_owned();
    let (got, body) = post(&agent, "/api/v1/packages", vec![Piece::Text("package", package)])?;
    ensure!(got == 400 && body["code"] == "missing_upload", "{got} {body}");
    ensure!(staged(&agent).is_empty(), "a refused package left {:?}", staged(&agent));
    ensure!(!Path::new("/tmp/hearth-escape.txt").exists(), "an absolute name was written");

    // Nothing was recorded or started by any of the {attempts} refused uploads.
    for list in [&["jobs", "--json"][..], &["request", "list", "--json"][..]] {
        let listed = json_of(&agent.cli(list)?)?;
        ensure!(listed.as_array().is_some_and(Vec::is_empty), "{list:?} after {attempts} refusals: {listed}");
    }
    Ok(())
}
