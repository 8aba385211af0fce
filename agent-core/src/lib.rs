//! The Hearth agent as a library: every part of the daemon and the `hearth` CLI lives here.
//!
//! Dependencies point one way: [`daemon`] wires the parts together, the `hearth` binary's CLI talks
//! to a running daemon only through [`api::client`], and the leaves ([`identity`], [`resources`])
//! import none of the coordinators; [`store`] knows the job record it persists ([`jobs`]). Events that cross modules are declared in [`events`]. See
//! `docs/architecture.md` for the map.

pub mod api;
pub mod availability;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod events;
#[cfg(test)]
mod fuzz;
pub mod identity;
pub mod jobs;
pub mod ledger;
pub mod market;
pub mod net;
pub mod packages;
pub mod proto;
pub mod resources;
mod secret_file;
pub mod store;
pub mod transfer;
pub mod uploads;
