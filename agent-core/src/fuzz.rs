//! Fuzz targets for every decoder a peer or a file reaches, run by [bolero] inside `cargo test`.
//!
//! Each target takes bytes as they arrive (from a peer, or as a file the owner named) and runs
//! them through what the agent does with them: the decoder, then the signature and the checks.
//! Bad input must give an error; a panic, an overflow caught by the debug build, a hang or an
//! allocation the size of the input's claims fails the test. Each target runs on:
//!
//! 1. every seed of its committed corpus, `agent-core/fuzz/corpus/TARGET/`: valid documents
//!    signed by a fixed test key, and known hostile ones (regenerate the valid ones with
//!    `cargo test -p agent-core --lib fuzz::write_seeds -- --ignored`);
//! 2. random byte strings;
//! 3. the seeds with random edits (bytes overwritten, inserted, removed, pieces of another seed
//!    spliced in), which reach past the parsers into the signature checks and the validation.
//!
//! Steps 2 and 3 each run for `HEARTH_FUZZ_SECONDS` (1 by default), so `scripts/test` bounds the
//! whole run; `scripts/fuzz` runs them longer in a release build. Bolero's own engines (libFuzzer,
//! AFL through `cargo bolero`) run the same targets coverage-guided where a nightly toolchain is
//! at hand.
//!
//! [bolero]: https://camshaft.github.io/bolero/

use std::io::{BufReader, Cursor};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bolero::generator::TypeGenerator;
use libp2p::PeerId;
use serde_json::Value;

use crate::availability::Capacity;
use crate::ledger::record::{CHECKPOINT_TAG, Checkpoint, Receipt};
use crate::net::advert;
use crate::net::negotiate::{
    AGREEMENT_TAG, JobRequest, Message, NOTICE_TAG, Notice, RELEASE_TAG, REQUEST_TAG, RESERVATION_TAG,
    RESERVE_TAG, Release, Reply, Reservation, ReserveRequest, Signed, Terms,
};
use crate::transfer::{store, wire};

/// The seeds' time: the documents in the corpus are issued then.
const SEED_NOW: i64 = 1_800_000_000;

/// How long the random inputs of one target run.
fn budget() -> Duration {
    let seconds = std::env::var("HEARTH_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    Duration::from_secs(seconds)
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

/// The committed seeds of `target`.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("no seed corpus at {}: {error}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    paths.sort();
    let seeds: Vec<Vec<u8>> = paths.iter().map(|path| std::fs::read(path).expect("seed")).collect();
    assert!(!seeds.is_empty(), "the seed corpus at {} is empty", dir.display());
    seeds
}

/// Random edits of one seed: which seed, where to cut it, and what to change.
#[derive(Debug, TypeGenerator)]
struct Edits {
    seed: u16,
    cut: Option<u32>,
    changes: Vec<(u32, u8, u8)>,
    splice: Option<(u16, u32, u32, u32)>,
}

impl Edits {
    fn apply(&self, seeds: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = seeds[usize::from(self.seed) % seeds.len()].clone();
        for &(at, op, byte) in self.changes.iter().take(16) {
            let at = at as usize % (bytes.len() + 1);
            match op % 4 {
                0 if at < bytes.len() => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                2 if at < bytes.len() => {
                    bytes.remove(at);
                }
                // A digit or a quote: the bytes that move JSON and TOML between meanings.
                _ => bytes.insert(at, b"0\"9-{}[],:e.\\"[usize::from(byte) % 13]),
            }
        }
        if let Some((other, from, length, at)) = self.splice {
            let other = &seeds[usize::from(other) % seeds.len()];
            let from = from as usize % (other.len() + 1);
            let end = from.saturating_add(length as usize % 256).min(other.len());
            let at = at as usize % (bytes.len() + 1);
            bytes.splice(at..at, other[from..end].iter().copied());
        }
        if let Some(cut) = self.cut {
            bytes.truncate(cut as usize % (bytes.len() + 1));
        }
        bytes
    }
}

macro_rules! fuzz {
    ($($name:ident => $target:path,)*) => {$(
        #[test]
        fn $name() {
            use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
            let seeds = seeds(stringify!($name));
            for seed in &seeds {
                $target(seed);
            }
            let (random, edited) = (AtomicU64::new(0), AtomicU64::new(0));
            bolero::check!().with_test_time(budget()).for_each(|bytes: &[u8]| {
                random.fetch_add(1, Relaxed);
                $target(bytes)
            });
            bolero::check!().with_type::<Edits>().with_test_time(budget()).for_each(|edits: &Edits| {
                edited.fetch_add(1, Relaxed);
                $target(&edits.apply(&seeds))
            });
            eprintln!(
                "fuzz {}: {} seeds, {} random inputs and {} edited seeds, {:?} each",
                stringify!($name),
                seeds.len(),
                random.load(Relaxed),
                edited.load(Relaxed),
                budget()
            );
        }
    )*};
}

fuzz! {
    advert_target => advert_bytes,
    negotiation_target => negotiation_bytes,
    reservation_target => negotiation_bytes,
    blob_wire_target => blob_wire_bytes,
    manifest_target => manifest_bytes,
    receipt_target => receipt_bytes,
    ledger_export_target => ledger_export_bytes,
    spec_target => spec_bytes,
    package_target => package_bytes,
    policy_target => policy_bytes,
    config_target => config_bytes,
    image_archive_target => image_archive_bytes,
    dns_query_target => dns_query_bytes,
}

/// A datagram a job sends its resolver.
fn dns_query_bytes(bytes: &[u8]) {
    let _ = crate::jobs::sandbox::dns::check_query(bytes);
}

/// The peer a document names in `field`, or a fixed one: the signer a seed's signature checks
/// against, so an unchanged seed gets past it.
fn named_peer(body: &Value, field: &str) -> PeerId {
    body.get(field).and_then(Value::as_str).and_then(|peer| peer.parse().ok()).unwrap_or_else(PeerId::random)
}

/// When the document says it was issued: the checks of its clock then pass for a seed.
fn issued(body: &Value) -> i64 {
    body.get("issued_at").and_then(Value::as_i64).unwrap_or(SEED_NOW)
}

/// An advert as it arrives on gossipsub, from the peer it names.
fn advert_bytes(bytes: &[u8]) {
    let body = serde_json::from_slice::<Value>(bytes).ok().map(|v| v["advert"].clone()).unwrap_or_default();
    let _ = advert::verify(bytes, &named_peer(&body, "peer_id"), issued(&body), None);
}

/// A negotiation message or reply as a peer sends it, opened as the agent opens each, and a job
/// request or a reservation ask checked as a provider checks them.
fn negotiation_bytes(bytes: &[u8]) {
    if let Ok(message) = serde_json::from_slice::<Message>(bytes) {
        match message {
            Message::Request { request } => {
                let (consumer, provider) =
                    (named_peer(&request.body, "consumer"), named_peer(&request.body, "provider"));
                if let Ok(opened) = request.open::<JobRequest>(REQUEST_TAG, &consumer) {
                    let capacity = Capacity { cpu_millis: 16_000, memory_bytes: 64 << 30, gpus: Vec::new() };
                    let _ = crate::market::check_request(
                        &opened,
                        &consumer,
                        &provider,
                        &capacity,
                        opened.issued_at,
                    );
                }
            }
            Message::Reserve { request } => {
                let (consumer, provider) =
                    (named_peer(&request.body, "consumer"), named_peer(&request.body, "provider"));
                if let Ok(ask) = request.open::<ReserveRequest>(RESERVE_TAG, &consumer) {
                    let _ = crate::market::check_ask(&ask, &consumer, &provider, ask.issued_at);
                }
            }
            Message::Offer { terms } => open::<Terms>(&terms, AGREEMENT_TAG, "provider"),
            Message::Notice { notice } => open::<Notice>(&notice, NOTICE_TAG, "provider"),
            Message::Release { release } => open::<Release>(&release, RELEASE_TAG, "consumer"),
            Message::Countersign { checkpoint: Some(checkpoint), .. } => {
                open::<Checkpoint>(&checkpoint, CHECKPOINT_TAG, "peer");
            }
            _ => {}
        }
    }
    if let Ok(reply) = serde_json::from_slice::<Reply>(bytes) {
        match reply {
            Reply::Notice { notice } => open::<Notice>(&notice, NOTICE_TAG, "provider"),
            Reply::Reserved { reservation } => open::<Reservation>(&reservation, RESERVATION_TAG, "provider"),
            Reply::Checkpoint { checkpoint: Some(checkpoint) } => {
                open::<Checkpoint>(&checkpoint, CHECKPOINT_TAG, "peer");
            }
            _ => {}
        }
    }
}

fn open<T: serde::de::DeserializeOwned>(signed: &Signed, tag: crate::identity::DomainTag, signer: &str) {
    let _ = signed.open::<T>(tag, &named_peer(&signed.body, signer));
    let _ = signed.hash();
}

/// A blob request and a blob answer as they arrive on a transfer stream.
fn blob_wire_bytes(bytes: &[u8]) {
    let _ = wire::Request::decode(bytes);
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    runtime.block_on(async {
        let _ = wire::Request::read(&mut Cursor::new(bytes)).await;
        let _ = wire::Answer::read(&mut Cursor::new(bytes)).await;
    });
}

/// A folder's manifest, as fetched from a peer.
fn manifest_bytes(bytes: &[u8]) {
    let _ = store::Manifest::decode(bytes);
}

/// A countersigned receipt, as the market and the ledger read it.
fn receipt_bytes(bytes: &[u8]) {
    if let Ok(receipt) = serde_json::from_slice::<Receipt>(bytes) {
        let _ = receipt.verify();
    }
}

/// A ledger export, verified from its text alone.
fn ledger_export_bytes(bytes: &[u8]) {
    let _ = crate::ledger::verify::verify_export(BufReader::new(bytes), Vec::new());
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A job spec, as a file or in a peer's job request.
fn spec_bytes(bytes: &[u8]) {
    let _ = hearth_api::spec::JobSpec::parse(&text(bytes), Path::new("job.toml"), Path::new("/nonexistent"));
}

/// A request package file.
fn package_bytes(bytes: &[u8]) {
    let _ = hearth_api::package::Package::parse(
        &text(bytes),
        Path::new("package.toml"),
        Path::new("/nonexistent"),
    );
}

/// The owner's policy file.
fn policy_bytes(bytes: &[u8]) {
    if let Ok(policy) = hearth_api::policy::Policy::parse(&text(bytes), "policy.toml") {
        for window in &policy.windows {
            let _ = window.parsed();
        }
    }
}

/// The agent's config file.
fn config_bytes(bytes: &[u8]) {
    let _ = crate::config::HearthConfig::parse(&text(bytes), Path::new("config.toml"));
}

/// An image archive (a rootfs tar, an OCI layout or a `docker save`), unpacked into a cache:
/// nothing may land outside it.
fn image_archive_bytes(bytes: &[u8]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = dir.path().join("image.tar");
    std::fs::write(&archive, bytes).expect("archive");
    let cache = dir.path().join("cache");
    let _ = crate::jobs::image::unpack_cached(&archive, &cache);
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("listing")
        .map(|entry| entry.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names == ["image.tar"] || names == ["cache", "image.tar"], "the unpack wrote {names:?}");
}

/// The valid seeds get past every check, so the edits of step 3 start from documents that reach
/// the deepest code, and a format change that leaves the corpus behind fails here.
#[test]
fn the_valid_seeds_pass_every_check() {
    let json = |target: &str, name: &str| -> Value {
        serde_json::from_slice(&std::fs::read(corpus_dir(target).join(name)).expect("seed")).expect("json")
    };
    let advert = std::fs::read(corpus_dir("advert_target").join("sharing.json")).expect("seed");
    let body = serde_json::from_slice::<Value>(&advert).expect("json")["advert"].clone();
    advert::verify(&advert, &named_peer(&body, "peer_id"), SEED_NOW, None).expect("the advert");

    let request: Signed =
        serde_json::from_value(json("negotiation_target", "request.json")["request"].clone())
            .expect("request");
    let (consumer, provider) = (named_peer(&request.body, "consumer"), named_peer(&request.body, "provider"));
    let opened: JobRequest = request.open(REQUEST_TAG, &consumer).expect("the request opens");
    let capacity = Capacity { cpu_millis: 16_000, memory_bytes: 64 << 30, gpus: Vec::new() };
    crate::market::check_request(&opened, &consumer, &provider, &capacity, SEED_NOW)
        .expect("the request passes");
    for (target, name, field, tag, signer) in [
        ("negotiation_target", "offer.json", "terms", AGREEMENT_TAG, "provider"),
        ("negotiation_target", "notice.json", "notice", NOTICE_TAG, "provider"),
        ("negotiation_target", "checkpoint.json", "checkpoint", CHECKPOINT_TAG, "peer"),
        ("reservation_target", "reserved.json", "reservation", RESERVATION_TAG, "provider"),
        ("reservation_target", "release.json", "release", RELEASE_TAG, "consumer"),
    ] {
        let signed: Signed = serde_json::from_value(json(target, name)[field].clone()).expect("signed");
        signed
            .open::<Value>(tag, &named_peer(&signed.body, signer))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let ask: Signed =
        serde_json::from_value(json("reservation_target", "reserve.json")["request"].clone()).expect("ask");
    let opened: ReserveRequest = ask.open(RESERVE_TAG, &consumer).expect("the ask opens");
    crate::market::check_ask(&opened, &consumer, &provider, SEED_NOW).expect("the ask passes");

    let receipt: Receipt =
        serde_json::from_value(json("receipt_target", "countersigned.json")).expect("receipt");
    receipt.verify().expect("the receipt");
    let export = std::fs::read(corpus_dir("ledger_export_target").join("two-rows.jsonl")).expect("seed");
    let report =
        crate::ledger::verify::verify_export(BufReader::new(export.as_slice()), Vec::new()).expect("export");
    assert_eq!((report.rows, report.broken, report.anchor), (2, None, crate::ledger::verify::Anchor::Signed));
    let manifest = std::fs::read(corpus_dir("manifest_target").join("two-files.json")).expect("seed");
    store::Manifest::decode(&manifest).expect("the manifest");
    let blob = std::fs::read(corpus_dir("blob_wire_target").join("request.json")).expect("seed");
    wire::Request::decode(&blob).expect("the blob request");

    for query in seeds("dns_query_target") {
        crate::jobs::sandbox::dns::check_query(&query).expect("the query");
    }

    let text = |target: &str| text(&seeds(target)[0]);
    hearth_api::policy::Policy::parse(&text("policy_target"), "policy.toml").expect("the policy");
    crate::config::HearthConfig::parse(&text("config_target"), Path::new("config.toml")).expect("the config");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    hearth_api::package::Package::parse(
        &text("package_target"),
        Path::new("package.toml"),
        &examples.join("pipeline"),
    )
    .expect("the package");
    hearth_api::spec::JobSpec::parse(
        &text("spec_target"),
        Path::new("count.toml"),
        &examples.join("pipeline"),
    )
    .expect("the spec");
    for name in ["rootfs.tar", "docker-save.tar"] {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::jobs::image::unpack_cached(&corpus_dir("image_archive_target").join(name), dir.path())
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    }
}

/// Writes the valid seeds, signed by fixed test keys, into the corpus.
#[test]
#[ignore = "writes the seed corpus; run by hand after a format changes"]
fn write_seeds() {
    seeds::write_all();
}

#[path = "fuzz/seeds.rs"]
mod seeds;
