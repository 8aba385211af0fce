//! Prints the agent crate's layer table and backward imports, or writes the table into
//! `docs/architecture.md` (`--write`).

use std::path::Path;

use anyhow::Result;
use hearth_tests::layers;

fn main() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let graph = layers::graph(&root.join("agent-core/src"))?;
    let table = layers::table(&graph);
    if std::env::args().any(|arg| arg == "--write") {
        let doc = root.join("docs/architecture.md");
        let text = std::fs::read_to_string(&doc)?;
        std::fs::write(&doc, layers::with_table(&text, &table)?)?;
    } else {
        print!("{table}");
    }
    for (from, to) in layers::backward(&graph)? {
        eprintln!("backward: {from} -> {to}");
    }
    Ok(())
}
