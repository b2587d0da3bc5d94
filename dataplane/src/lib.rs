//! wsplice: a WebSocket load balancer whose established streams are carried by the kernel.
//!
//! Data flow, one module per stage: [`server`] (listeners, workers) -> [`tls`] (wss://) ->
//! [`http`] (request, upgrade validation; [`client`] and [`member`]: each side's head of the
//! handshake) ->
//! [`router`] + [`balancer`] (which member) -> [`dataplane`] (hand-over) -> [`offload`] (BPF
//! sockmap) or [`relay`] (userspace, rustls for TLS legs).
//! Only [`sys`] talks to the kernel with `unsafe`.
#![deny(unsafe_code)]

pub mod balancer;
pub mod client;
pub mod config;
pub mod dataplane;
pub mod head;
pub mod health;
pub mod http;
pub mod member;
pub mod offload;
pub mod relay;
pub mod router;
pub mod server;
pub mod splice;
pub mod sys;
pub mod tls;
