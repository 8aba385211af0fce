//! The agent crate's dependencies point down its layers, and the map in docs/architecture.md
//! shows the imports as they are (see tests/src/layers.rs).

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
