//! The agent crate's layering, read from its sources: which top-level module imports which, the
//! layers they must respect, and the table `docs/architecture.md` shows.
//!
//! Dependencies point one way, down the [`LAYERS`]: a module may import a module of a lower
//! layer, never one of its own layer or above. An import is any `crate::NAME` path in the code
//! (in `use` lines, grouped or not, and inline), `super::` paths that climb out of a module, and
//! `hearth::NAME` in the binary's files. Comments are skipped. [`KNOWN`] lists the backward
//! imports that remain to be undone; the check fails on any other, and on a listed one that is
//! gone (so the list only shrinks).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The layers, lowest first. Each module belongs to exactly one.
pub const LAYERS: &[&[&str]] = &[
    // Shared formats and helpers that know nothing of the agent's parts.
    &["clock", "proto", "secret_file"],
    // Plain facts about the machine and the agent.
    &["identity", "resources", "config"],
    // The one place that writes SQL, and the folders uploads are staged in.
    &["store", "uploads"],
    // The event bus every service publishes on.
    &["events"],
    // Services that own one concern each.
    &["jobs", "availability"],
    &["net"],
    &["transfer", "ledger"],
    // Coordinators of several services.
    &["market"],
    &["packages"],
    // Clients' way in, then the wiring and the binary; and the fuzz targets (tests only), which
    // reach every decoder.
    &["api"],
    &["daemon"],
    &["cli", "main", "fuzz"],
];

/// Backward imports not undone yet, as `(from, to)`: none. (The event type and the job record,
/// which once tied `events` and `store` to the services above them, are wire types of the
/// `hearth-api` crate.)
pub const KNOWN: &[(&str, &str)] = &[];

/// Crates the client crate must not link, directly or through another: the network stack, the
/// WebAssembly runtime and SQLite. A client (the desktop shell, a script) stays small without them.
pub const ENGINE: &[&str] = &["libp2p", "wasmtime", "rusqlite", "libsqlite3-sys"];

/// The crates `package` links in a normal build for this machine (no dev or build
/// dependencies), as `cargo tree` of the workspace at `root` lists them.
pub fn linked(root: &Path, package: &str) -> Result<BTreeSet<String>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = std::process::Command::new(cargo)
        .args(["tree", "--package", package, "--edges", "normal", "--prefix", "none", "--format", "{p}"])
        .args(["--locked", "--offline"])
        .current_dir(root)
        .output()
        .context("running cargo tree")?;
    if !output.status.success() {
        bail!("cargo tree failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let text = String::from_utf8(output.stdout)?;
    Ok(text.lines().filter_map(|line| line.split_whitespace().next()).map(str::to_owned).collect())
}

/// The [`ENGINE`] crates among `linked`.
pub fn engine_crates(linked: &BTreeSet<String>) -> Vec<String> {
    linked.iter().filter(|name| ENGINE.contains(&name.as_str())).cloned().collect()
}

/// Every top-level module's imports of other top-level modules.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// Reads every `.rs` file under `src` (the agent crate's `src/`).
pub fn graph(src: &Path) -> Result<Graph> {
    let mut graph = Graph::new();
    for file in rust_files(src)? {
        let relative = file.strip_prefix(src).context("outside src")?;
        let Some(path) = module_path(relative) else { continue };
        let Some(own) = path.first().cloned() else { continue };
        let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        let imports = graph.entry(own.clone()).or_default();
        for target in imports_of(&text, &path) {
            if target != own {
                imports.insert(target);
            }
        }
    }
    Ok(graph)
}

/// The layer of `module`, or `None` for a module [`LAYERS`] does not name.
pub fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// Every import that does not point down the layers, as `(from, to)`; a module no layer names
/// is an error.
pub fn backward(graph: &Graph) -> Result<Vec<(String, String)>> {
    let mut found = Vec::new();
    for (from, imports) in graph {
        let Some(from_layer) = layer(from) else {
            bail!("module `{from}` is in no layer of tests/src/layers.rs")
        };
        for to in imports {
            let Some(to_layer) = layer(to) else {
                bail!("module `{to}` is in no layer of tests/src/layers.rs")
            };
            if to_layer >= from_layer {
                found.push((from.clone(), to.clone()));
            }
        }
    }
    Ok(found)
}

/// Fails on a backward import that [`KNOWN`] does not list, and on a listed one that is gone.
pub fn check(graph: &Graph) -> Result<()> {
    let found = backward(graph)?;
    let known: BTreeSet<(String, String)> =
        KNOWN.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect();
    let new: Vec<String> =
        found.iter().filter(|edge| !known.contains(*edge)).map(|(a, b)| format!("{a} -> {b}")).collect();
    if !new.is_empty() {
        bail!(
            "backward imports (a module may only import modules of lower layers, see tests/src/layers.rs): {}",
            new.join(", ")
        );
    }
    let found: BTreeSet<(String, String)> = found.into_iter().collect();
    let gone: Vec<String> =
        known.iter().filter(|edge| !found.contains(*edge)).map(|(a, b)| format!("{a} -> {b}")).collect();
    if !gone.is_empty() {
        bail!("undone, so take them off KNOWN in tests/src/layers.rs: {}", gone.join(", "));
    }
    Ok(())
}

/// The markdown table of layers and imports that `docs/architecture.md` shows.
pub fn table(graph: &Graph) -> String {
    let mut out = String::from("| layer | module | imports from the crate |\n|---|---|---|\n");
    for (number, modules) in LAYERS.iter().enumerate() {
        for module in *modules {
            let imports = graph.get(*module).map(|set| {
                let mut sorted: Vec<&String> = set.iter().collect();
                sorted.sort_by_key(|m| (layer(m), (*m).clone()));
                sorted.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", ")
            });
            let imports = imports.filter(|s| !s.is_empty()).unwrap_or_else(|| "nothing".to_owned());
            out.push_str(&format!("| {number} | `{module}` | {imports} |\n"));
        }
    }
    out
}

/// The text between the layer-table markers of a document.
pub const BEGIN: &str =
    "<!-- layers:begin (generated by `cargo run -p hearth-tests --bin layers -- --write`) -->\n";
/// The end marker.
pub const END: &str = "<!-- layers:end -->\n";

/// `document` with its table replaced by `table`.
pub fn with_table(document: &str, table: &str) -> Result<String> {
    let start = document.find(BEGIN).context("no layers:begin marker")? + BEGIN.len();
    let end = document[start..].find(END).context("no layers:end marker")? + start;
    Ok(format!("{}{table}{}", &document[..start], &document[end..]))
}

/// The module path of a source file relative to `src/`: `api/client/events.rs` is
/// `[api, client, events]`, `api.rs` is `[api]`; `lib.rs` is none.
fn module_path(relative: &Path) -> Option<Vec<String>> {
    let mut parts: Vec<String> = relative
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts == ["lib"] {
        return None;
    }
    if parts.last().is_some_and(|last| last == "mod") {
        parts.pop();
    }
    Some(parts)
}

/// The top-level modules a file at module `path` refers to.
fn imports_of(text: &str, path: &[String]) -> BTreeSet<String> {
    let code: String =
        text.lines().map(|line| line.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let mut found = BTreeSet::new();
    for root in ["crate::", "hearth::"] {
        for (at, _) in code.match_indices(root) {
            if at > 0
                && code[..at].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
            {
                continue;
            }
            found.extend(first_names(&code[at + root.len()..]));
        }
    }
    // `super::` climbs from the file's module; only a climb out of the top-level module matters.
    for (at, _) in code.match_indices("super::") {
        if at > 0
            && code[..at].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
        {
            continue;
        }
        let mut rest = &code[at..];
        let mut depth = path.len();
        while let Some(after) = rest.strip_prefix("super::") {
            depth = depth.saturating_sub(1);
            rest = after;
        }
        if depth == 0 {
            found.extend(first_names(rest));
        }
    }
    found
}

/// The first path segment of `rest`, or each group member's first segment for `{a, b::c}`.
fn first_names(rest: &str) -> Vec<String> {
    if let Some(group) = rest.strip_prefix('{') {
        let mut names = Vec::new();
        let mut depth = 0usize;
        let mut item = String::new();
        for c in group.chars() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    names.extend(ident(item.trim()));
                    item.clear();
                    continue;
                }
                _ => {}
            }
            if depth == 0 || c != '{' {
                item.push(c);
            }
        }
        names.extend(ident(item.trim()));
        return names;
    }
    ident(rest).into_iter().collect()
}

fn ident(text: &str) -> Option<String> {
    let name: String = text.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    (!name.is_empty() && name != "self" && name != "super").then_some(name)
}

fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            files.extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(text: &str, path: &[&str]) -> Vec<String> {
        let path: Vec<String> = path.iter().map(|s| (*s).to_owned()).collect();
        imports_of(text, &path).into_iter().collect()
    }

    #[test]
    fn imports_are_found_in_every_form() {
        let text = "use crate::jobs::{self, JobRecord};\nuse crate::{net::Network, store::{Store, StoreError}};\n\
                    fn f() { crate::clock::unix_now(); }\n// crate::daemon in a comment\nuse super::super::ledger::X;\n";
        assert_eq!(names(text, &["market", "consumer"]), ["clock", "jobs", "ledger", "net", "store"]);
        assert_eq!(names("use super::Inner;\n", &["market", "consumer"]), Vec::<String>::new());
        assert_eq!(names("use super::Inner;\n", &["market"]), ["Inner"]);
        assert_eq!(names("use hearth::api::client::Client;\n", &["cli"]), ["api"]);
        assert_eq!(names("let x = my_crate::net;", &["api"]), Vec::<String>::new());
    }

    #[test]
    fn a_backward_import_is_caught_and_a_forward_one_is_not() {
        let mut graph = Graph::new();
        graph.entry("market".into()).or_default().insert("jobs".into());
        assert_eq!(backward(&graph).unwrap(), Vec::<(String, String)>::new());
        // The deliberate backward import: a leaf reaching up to a coordinator.
        graph.entry("jobs".into()).or_default().insert("market".into());
        assert_eq!(backward(&graph).unwrap(), [("jobs".to_owned(), "market".to_owned())]);
        // And one within a layer.
        graph.entry("transfer".into()).or_default().insert("ledger".into());
        assert_eq!(backward(&graph).unwrap().len(), 2);
        assert!(check(&graph).unwrap_err().to_string().contains("jobs -> market"));
    }

    #[test]
    fn the_table_lands_between_its_markers() {
        let document = format!("intro\n{BEGIN}old\n{END}after\n");
        assert_eq!(with_table(&document, "new\n").unwrap(), format!("intro\n{BEGIN}new\n{END}after\n"));
        assert!(with_table("no markers", "x").is_err());
    }
}
