//! Nix's side of nsh: what the Nix tools and stores speak and hold.
//!
//! The wire format ([`wire`]), NARs ([`nar`]), store paths ([`store_path`]),
//! derivations ([`drv`], with nsh's own `nshResources` attribute in
//! [`resources`]), the `nix-store --serve` protocol ([`serve`]: codec,
//! client, and a stand-in server for tests), the Nix daemon's worker
//! protocol as far as validity questions ([`daemon`]), the NAR of a local
//! path read from the filesystem ([`dump`]), the local store
//! reached through one serve process or the daemon's socket
//! ([`local_store`]) and its temporary GC roots ([`temp_roots`]).

pub mod daemon;
pub mod drv;
pub mod dump;
pub mod hash;
pub mod local_store;
pub mod nar;
pub mod resources;
pub mod serve;
pub mod signing;
pub mod store_path;
pub mod temp_roots;
pub mod wire;
