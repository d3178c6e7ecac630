//! # teleport_core
//!
//! The plain-Rust core of teleport, usable and testable without an Erlang VM:
//!
//! - [`etf`]: tags and limits of Erlang's external term format;
//! - [`encode`]: the [`encode::Writer`] that lays out encoded terms as chunks, keeping large
//!   binaries by reference (zero-copy);
//! - [`decode`]: an iterative, bounds-checked parser driving a [`decode::Builder`];
//! - [`value`]: a Rust picture of terms for tests and fuzzing;
//! - [`handshake`]: the cookie challenge-response that opens every connection;
//! - [`frame`]: the data frames on an authenticated connection;
//! - [`out_frame`], [`conn`], [`pool`]: the sending side, a pool of outgoing connections;
//!   [`recycle`] keeps small frames' buffers for the next ones;
//! - [`listener`], [`lanes`]: the receiving side, which keeps a slot's reconnections in turn;
//! - [`pump`], [`poller`], [`epoll`]: an incoming connection's frames, read without blocking
//!   by a fixed set of poll threads;
//! - [`peers`], [`stats`]: which peers may connect, and counters per peer;
//! - [`sockopts`]: the socket options the user sets, applied to every connection;
//! - [`threads`]: teleport's OS threads, at a priority below the VM's schedulers;
//! - [`tls`]: TLS with rustls, mutually authenticated against one CA, and the value that
//!   binds the cookie handshake to the TLS session; [`secure`]: a connection's bytes through
//!   its session;
//! - [`log`]: the `tracing` subscriber whose records the NIF forwards to Erlang's `logger`.
//!
//! The Erlang side lives in the `teleport_nif` crate, which only walks and makes terms.

// No unsafe code but two `setsockopt`/`getsockopt` calls in `sockopts` (SO_PRIORITY, which
// socket2 0.5 does not wrap), the priority syscalls in `threads` and the epoll calls in
// `epoll`, each allowed where it stands.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod acks;
pub mod conn;
pub mod deadline;
pub mod decode;
pub mod encode;
pub mod epoll;
pub mod etf;
pub mod frame;
pub mod handshake;
pub mod lanes;
pub mod listener;
pub mod log;
pub mod out_frame;
pub mod peers;
pub mod poller;
pub mod pool;
pub mod pump;
pub mod record;
pub mod recycle;
pub mod secure;
pub mod sockopts;
pub mod stats;
#[cfg(test)]
mod testing;
pub mod threads;
pub mod tls;
pub mod value;
