//! The agent crate's dependencies point down its layers, the map in docs/architecture.md shows
//! the imports as they are, and the client crate links no engine (see tests/src/layers.rs).

use std::path::Path;

use anyhow::{Result, ensure};
use hearth_tests::layers;

pub(crate) fn dependencies_point_down_the_layers_and_the_map_shows_them() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let graph = layers::graph(&root.join("agent-core/src"))?;
    layers::check(&graph)?;
    let doc = std::fs::read_to_string(root.join("docs/architecture.md"))?;
    let table = layers::table(&graph);
    ensure!(
        layers::with_table(&doc, &table)? == doc,
        "docs/architecture.md's layer table is out of date: run `cargo run -p hearth-tests --bin layers -- --write`"
    );
    Ok(())
}

pub(crate) fn the_client_crate_links_no_engine() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let agent = layers::linked(&root, "agent-core")?;
    // The check can fail: the agent, which does link them, is caught by it.
    ensure!(layers::engine_crates(&agent).len() == layers::ENGINE.len(), "the agent's graph: {agent:?}");
    let client = layers::linked(&root, "hearth-api")?;
    ensure!(client.contains("reqwest"), "the client crate's graph was not read: {client:?}");
    let engine = layers::engine_crates(&client);
    ensure!(engine.is_empty(), "hearth-api links {engine:?}; keep the engine out of the client crate");
    Ok(())
}
