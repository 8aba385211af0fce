//! The valid seeds of the fuzz corpus: documents as the agent sends them, signed by fixed test
//! keys and issued at [`SEED_NOW`], so that each opens and passes its checks unchanged.

use std::fs;
use std::path::Path;

use serde::Serialize;
use serde_json::{Value, json};

use super::{SEED_NOW, corpus_dir};
use crate::identity::Identity;
use crate::ledger::record::{self, CHECKPOINT_TAG, Kind, Receipt, ReceiptBody, Usage};
use crate::ledger::tests::identity_from;
use crate::ledger::{Ledger, Mode};
use crate::net::advert::{self, Prices};
use crate::net::negotiate::{
    AGREEMENT_TAG, Message, NOTICE_TAG, RELEASE_TAG, REQUEST_TAG, RESERVATION_TAG, RESERVE_TAG, Reply,
    Signed, VERSION,
};
use crate::transfer::{store, wire};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = corpus_dir(target);
    fs::create_dir_all(&dir).expect("corpus folder");
    fs::write(dir.join(name), bytes).expect("seed");
}

fn write_json(target: &str, name: &str, value: &impl Serialize) {
    write(target, name, &serde_json::to_vec(value).expect("json"));
}

fn signed(identity: &Identity, tag: crate::identity::DomainTag, body: Value) -> Signed {
    Signed::sign(identity, tag, &body).expect("signing")
}

pub(super) fn write_all() {
    let (consumer, provider) = (identity_from(1), identity_from(2));
    let (c, p) = (consumer.peer_id().to_string(), provider.peer_id().to_string());
    let allocation = json!({ "cpu_millis": 1000, "memory_bytes": 1 << 28, "disk_bytes": 1 << 30, "gpus": 0, "vram_bytes": 0 });
    let prices = json!({ "core_hour": 1000, "memory_gib_hour": 100, "gpu_hour": 0 });

    let body: hearth_api::market::AdvertBody = serde_json::from_value(json!({
        "version": advert::ADVERT_VERSION, "peer_id": p, "seq": 7, "issued_at": SEED_NOW,
        "expires_at": SEED_NOW + 600, "state": "sharing", "paused_because": [],
        "free": { "cpu_millis": 6000, "memory_bytes": 1u64 << 34, "disk_bytes": 1u64 << 36, "gpus": [] },
        "windows": [[SEED_NOW, SEED_NOW + 3600]], "prices": prices, "reputation": { "completed": 12, "failed": 1 }
    }))
    .expect("advert body");
    write("advert_target", "sharing.json", &advert::sign(&provider, body).expect("advert").wire);

    let request = signed(
        &consumer,
        REQUEST_TAG,
        json!({
            "version": VERSION, "request_id": "0123456789abcdef", "consumer": c, "provider": p,
            "issued_at": SEED_NOW, "expires_at": SEED_NOW + 60,
            "spec": "kind = \"native\"\ncommand = [\"/bin/sh\", \"-c\", \"wc -w /in/poem.txt\"]\ninputs = [\"poem.txt\"]\n[resources]\ncpu = 1.0\nmemory = \"256MiB\"\n",
            "files": { "poem.txt": { "hash": "ab".repeat(32), "format": "raw" } },
            "resources": allocation, "time_limit_s": 60, "network": false, "hosted": false,
            "max_price_per_hour": 2000
        }),
    );
    let terms = signed(
        &provider,
        AGREEMENT_TAG,
        json!({
            "version": VERSION, "agreement_id": "a1b2c3d4e5f60718", "request_id": "0123456789abcdef",
            "request_hash": request.hash().expect("hash"), "provider": p, "consumer": c,
            "resources": allocation, "prices": prices, "price_per_hour": 1025,
            "window": [SEED_NOW, SEED_NOW + 60], "access_key": "ab".repeat(32), "hosted": false,
            "network": false, "gpus": [], "issued_at": SEED_NOW, "expires_at": SEED_NOW + 60
        }),
    );
    let receipt = receipt(&provider, &consumer);
    let notice = signed(
        &provider,
        NOTICE_TAG,
        json!({
            "version": VERSION, "agreement_id": "a1b2c3d4e5f60718", "provider": p, "consumer": c,
            "seq": 3, "at": SEED_NOW + 60, "job": { "state": "finished", "exit_code": 0 },
            "reason": null, "outputs": { "hash": "cd".repeat(32), "format": "folder" },
            "receipt": { "body": receipt.receipt, "signature": receipt.provider_signature }
        }),
    );
    let checkpoint = signed(
        &consumer,
        CHECKPOINT_TAG,
        json!({ "version": VERSION, "peer": c, "seq": 12, "head": "ef".repeat(32), "at": SEED_NOW }),
    );
    let release = signed(
        &consumer,
        RELEASE_TAG,
        json!({ "version": VERSION, "reservation_id": "0123456789abcdef", "consumer": c, "provider": p,
                "at": SEED_NOW, "reason": "the package finished" }),
    );
    let messages = [
        ("request", Message::Request { request }),
        ("offer", Message::Offer { terms }),
        ("notice", Message::Notice { notice: notice.clone() }),
        (
            "countersign",
            Message::Countersign {
                agreement_id: "a1b2c3d4e5f60718".into(),
                signature: receipt.consumer_signature.clone(),
                checkpoint: Some(checkpoint.clone()),
            },
        ),
        ("withdraw", Message::Withdraw { request_id: "0123456789abcdef".into() }),
        ("cancel", Message::Cancel { agreement_id: "a1b2c3d4e5f60718".into() }),
        ("status", Message::Status { agreement_id: "a1b2c3d4e5f60718".into() }),
        ("witness", Message::Witness),
        (
            "logs",
            Message::Logs {
                agreement_id: "a1b2c3d4e5f60718".into(),
                stream: hearth_api::jobs::Stream::Stdout,
                offset: 4096,
                wait: true,
            },
        ),
    ];
    for (name, message) in &messages {
        write_json("negotiation_target", &format!("{name}.json"), message);
    }
    let replies = [
        ("queued", Reply::Queued { position: 2 }),
        ("refused", Reply::Refused { reason: "this agent is paused".into() }),
        ("notice-reply", Reply::Notice { notice }),
        ("checkpoint", Reply::Checkpoint { checkpoint: Some(checkpoint) }),
        ("log-text", Reply::Logs { text: "hello\n".into(), next_offset: 6, finished: true }),
    ];
    for (name, reply) in &replies {
        write_json("negotiation_target", &format!("{name}.json"), reply);
    }

    let ask = signed(
        &consumer,
        RESERVE_TAG,
        json!({
            "version": VERSION, "reservation_id": "0123456789abcdef", "request_id": "fedcba9876543210",
            "resource": "train", "consumer": c, "provider": p, "issued_at": SEED_NOW,
            "resources": allocation, "network": false, "max_price_per_hour": null, "hold_s": 600
        }),
    );
    let grant = signed(
        &provider,
        RESERVATION_TAG,
        json!({
            "version": VERSION, "reservation_id": "0123456789abcdef", "request_hash": ask.hash().expect("hash"),
            "provider": p, "consumer": c, "resources": allocation, "prices": prices, "gpus": [],
            "issued_at": SEED_NOW, "expires_at": SEED_NOW + 600
        }),
    );
    write_json("reservation_target", "reserve.json", &Message::Reserve { request: ask });
    write_json("reservation_target", "reserved.json", &Reply::Reserved { reservation: grant });
    write_json(
        "reservation_target",
        "keep.json",
        &Message::Keep { reservation_id: "0123456789abcdef".into() },
    );
    write_json("reservation_target", "release.json", &Message::Release { release });

    write_json("receipt_target", "countersigned.json", &receipt);

    let hash: hearth_api::blob::BlobHash = bao_tree::blake3::hash(b"a blob").to_hex().parse().expect("hash");
    let ranges = bao_tree::ChunkRanges::from(bao_tree::ChunkNum(0)..bao_tree::ChunkNum(4))
        | bao_tree::ChunkRanges::from(bao_tree::ChunkNum(9)..);
    let blob_request = wire::Request { hash, ranges };
    write("blob_wire_target", "request.json", &blob_request.encode());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        for (name, answer) in [
            ("answer-ok", wire::Answer::Ok { size: 1 << 20 }),
            ("answer-busy", wire::Answer::Refused { status: wire::Status::Busy, reason: "busy".into() }),
        ] {
            let mut frame = Vec::new();
            answer.write(&mut frame).await.expect("answer");
            write("blob_wire_target", name, &frame);
        }
        let mut frame = Vec::new();
        blob_request.write(&mut frame).await.expect("request");
        write("blob_wire_target", "request-frame", &frame);
    });

    let manifest = store::Manifest {
        version: 1,
        files: vec![
            store::ManifestFile { path: "a/b.txt".into(), size: 6, hash, executable: false },
            store::ManifestFile { path: "run.sh".into(), size: 6, hash, executable: true },
        ],
    };
    write("manifest_target", "two-files.json", &manifest.encode());

    runtime.block_on(ledger_export(&provider, &consumer, &receipt));

    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for (target, name, source) in [
        ("spec_target", "wordcount.toml", "wordcount/job.toml"),
        ("spec_target", "count.toml", "pipeline/count.toml"),
        ("spec_target", "report.toml", "pipeline/report.toml"),
        ("package_target", "pipeline.toml", "pipeline/package.toml"),
        ("policy_target", "share-now.toml", "share-now.toml"),
    ] {
        write(target, name, &fs::read(examples.join(source)).expect("example"));
    }
    write(
        "config_target",
        "everything.toml",
        b"[api]\nport = 7780\nupload_max_bytes = 1073741824\nupload_max_file_bytes = 1048576\n\
          upload_max_files = 100\n\n[resources]\nrefresh_interval = \"5s\"\n\n[log]\nlevel = \"info\"\n\n\
          [network]\nlisten = [\"/ip4/0.0.0.0/tcp/7781\", \"/ip4/0.0.0.0/udp/7781/quic-v1\"]\n\
          bootstrap = [\"/ip4/192.0.2.1/tcp/7781/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN\"]\n\
          mdns = false\nrelay = true\n\n[ledger]\nmode = \"batch\"\n",
    );
    // A query for example.org's A record, and one for its AAAA record with an EDNS record.
    let question = b"\x07example\x03org\x00";
    let query =
        [&b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"[..], question, b"\x00\x01\x00\x01"].concat();
    write("dns_query_target", "a.bin", &query);
    let edns = [
        &b"\xab\xcd\x01\x20\x00\x01\x00\x00\x00\x00\x00\x01"[..],
        question,
        b"\x00\x1c\x00\x01",
        b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00",
    ]
    .concat();
    write("dns_query_target", "aaaa-edns.bin", &edns);
    write(
        "image_archive_target",
        "rootfs.tar",
        &tar_of(&[("bin/hello", b"#!/bin/sh\necho hi\n"), ("etc/os-release", b"ID=fuzz\n")]),
    );
    let layer = tar_of(&[("usr/bin/tool", b"tool"), (".wh.gone", b""), ("opt/.wh..wh..opq", b"")]);
    let manifest = "[{\"Config\":\"config.json\",\"Layers\":[\"layer/layer.tar\"]}]";
    // The layer's digest, so the seed gets past the check and reaches the layer's entries.
    let diff_id = hex::encode(ring::digest::digest(&ring::digest::SHA256, &layer));
    let config = format!("{{\"rootfs\":{{\"type\":\"layers\",\"diff_ids\":[\"sha256:{diff_id}\"]}}}}");
    write(
        "image_archive_target",
        "docker-save.tar",
        &tar_of(&[
            ("manifest.json", manifest.as_bytes()),
            ("config.json", config.as_bytes()),
            ("layer/layer.tar", &layer),
        ]),
    );
}

fn receipt(provider: &Identity, consumer: &Identity) -> Receipt {
    let prices = Prices { core_hour: 1000, memory_gib_hour: 100, gpu_hour: 10_000 };
    let charges = record::charges(&prices, 1000, 1 << 30, 0, 60_000);
    let body = ReceiptBody {
        version: VERSION,
        agreement_id: "a1b2c3d4e5f60718".into(),
        agreement_hash: "ab".repeat(32),
        provider: provider.peer_id().to_string().into(),
        consumer: consumer.peer_id().to_string().into(),
        outcome: "finished".into(),
        exit_code: Some(0),
        result: Some("cd".repeat(32)),
        usage: Usage { running_ms: 60_000, cpu_core_ms: 59_000, ..Usage::default() },
        prices,
        price_per_hour: 1100,
        charges,
        amount: charges.total(),
        started_at: SEED_NOW,
        ended_at: SEED_NOW + 60,
    };
    let signed = Signed::sign(provider, record::RECEIPT_TAG, &body).expect("receipt");
    Receipt::countersign(consumer, signed).expect("countersign")
}

async fn ledger_export(owner: &Identity, peer: &Identity, receipt: &Receipt) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hearth.db");
    let store = crate::store::Store::open(&path, &owner.peer_id()).await.expect("store");
    let ledger = Ledger::new(store, owner.clone(), Mode::Realtime);
    ledger.append_receipt(receipt).await.expect("receipt");
    let release = json!({ "agreement_id": "a1b2c3d4e5f60718", "outcome": "finished", "peer": peer.peer_id().to_string() });
    ledger.record(Kind::Release, &release).await.expect("record");
    ledger.flush().await.expect("flush");
    // With every kind of line: a witness's checkpoint of this ledger, one held of the peer's, and
    // the signed head.
    let witnessed = ledger.checkpoint().await.expect("checkpoint").expect("a head");
    let held = signed(
        peer,
        CHECKPOINT_TAG,
        json!({ "version": VERSION, "peer": peer.peer_id().to_string(), "seq": 3, "head": "ef".repeat(32), "at": SEED_NOW }),
    );
    let extras = crate::ledger::ExportExtras {
        signer: Some(owner),
        witnesses: vec![(peer.peer_id().to_string(), witnessed)],
        held: vec![held],
    };
    let mut jsonl = Vec::new();
    crate::ledger::export_file(&path, crate::ledger::verify::ExportFormat::Jsonl, &mut jsonl, &extras)
        .expect("export");
    write("ledger_export_target", "two-rows.jsonl", &jsonl);
}

fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o755);
        header.set_cksum();
        builder.append_data(&mut header, path, *data).expect("tar entry");
    }
    builder.into_inner().expect("tar")
}
