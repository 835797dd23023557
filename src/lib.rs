//! wsgate: an admission gateway for WebSocket upstreams, built on Pingora.
//!
//! Modules follow a request: `config` says what is allowed, `route` finds the
//! route, `client` names the client, `admission` takes slots, `proxy` carries
//! the stream, `metrics` and `admin` report on it, `server` wires it together.
#![forbid(unsafe_code)]

pub mod admission;
pub mod client;
pub mod config;
pub mod route;
