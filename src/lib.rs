//! wsgate: an admission gateway for WebSocket upstreams, built on Pingora.
//!
//! Modules in the order a request meets them: `config` says what is allowed
//! (`pem` checks the TLS files it names); `listen` binds the listening
//! sockets; `accept` keeps each new socket on the thread that serves it;
//! `conn` is the front door that owns each connection, and `handshake` carries a connection's first request
//! there when it is a plain WebSocket upgrade, `proxy` hooks into Pingora
//! for everything else; `request` tells a stream from plain HTTP, `route`
//! finds the route and its key, `client` names the client, `stream` is what
//! every upgrade goes through either way, `admission` takes the slots (and
//! `cluster` takes them across a fleet of instances), `refusal` answers when
//! it cannot, and `relay` carries the stream; `gateway` holds the shared
//! state, `metrics` and `admin` report on it, `server` wires it up.
#![deny(unsafe_code)]

pub mod accept;
pub mod admin;
pub mod admission;
pub mod client;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod gateway;
pub mod handshake;
pub mod listen;
pub mod metrics;
pub mod pem;
pub mod proxy;
pub mod rate;
pub mod refusal;
pub mod relay;
pub mod reload;
pub mod request;
pub mod route;
pub mod server;
pub mod stream;
pub mod upgrade;
