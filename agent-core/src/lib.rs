//! The Hearth agent as a library: every part of the daemon and the `hearth` CLI lives here.
//!
//! Dependencies point one way: [`daemon`] wires the parts together, [`cli`] talks to a running
//! daemon only through [`api::client`], and the leaves ([`identity`], [`store`], [`resources`])
//! import none of the coordinators. See `docs/architecture.md` for the map.

pub mod config;
pub mod identity;
pub mod store;
