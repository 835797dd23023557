//! The admin listener: `GET /metrics` (Prometheus text), `GET /healthz` and
//! `GET /status` (JSON: each route's limits, live counts and busiest keys;
//! in a fleet, a `cluster` object with the fleet-wide counts from Redis).
//! It binds its own address, loopback by default, apart from client traffic.

use crate::gateway::Gateway;
use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};
use std::sync::Arc;

/// How many of the busiest keys `/status` lists per scope.
const BUSIEST: usize = 10;

pub struct Admin {
    gateway: Arc<Gateway>,
}

impl Admin {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }

    /// The `/status` document.
    pub fn status(&self) -> Value {
        let snapshot = self.gateway.snapshot();
        let mut routes = Vec::new();
        let mut configured = Vec::new();
        for live in &snapshot.routes {
            let r = &live.route;
            configured.push(r.name.clone());
            routes.push(json!({
                "name": r.name.as_ref(),
                "dry_run": r.dry_run,
                "limits": {
                    "total": r.limits.total,
                    "per_key": r.limits.per_key,
                    "per_client": r.limits.per_client,
                },
                "live": live.slots.live(),
                "tracked_keys": live.slots.keys().tracked(),
                "tracked_clients": live.slots.clients().tracked(),
                "busiest_keys": live.slots.keys().busiest(BUSIEST).into_iter()
                    .map(|(k, n)| json!({"key": k.as_ref(), "live": n})).collect::<Vec<_>>(),
                "busiest_clients": live.slots.clients().busiest(BUSIEST).into_iter()
                    .map(|(c, n)| json!({"client": c.to_string(), "live": n})).collect::<Vec<_>>(),
            }));
        }

        // Routes removed by a reload whose streams are still running.
        let draining: Vec<Value> = self
            .gateway
            .table
            .routes()
            .into_iter()
            .filter(|(name, slots)| !configured.contains(name) && slots.live() > 0)
            .map(|(name, slots)| json!({"name": name.as_ref(), "live": slots.live()}))
            .collect();

        json!({
            "routes": routes,
            "draining_routes": draining,
            "global": {
                "per_client": snapshot.config.global_per_client,
                "tracked_clients": self.gateway.table.global_clients().tracked(),
            },
        })
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let (status, content_type, body) = match (&req.method, req.uri.path()) {
            (&Method::GET, "/metrics") => (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.gateway
                    .metrics
                    .render(&self.gateway.table)
                    .into_bytes(),
            ),
            (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            (&Method::GET, "/status") => {
                let mut status = self.status();
                if let Some(fleet) = &self.gateway.fleet {
                    let snapshot = self.gateway.snapshot();
                    let names: Vec<&str> = snapshot
                        .routes
                        .iter()
                        .map(|r| r.route.name.as_ref())
                        .collect();
                    status["cluster"] = fleet.status(&names).await;
                }
                let body = serde_json::to_vec_pretty(&status).unwrap_or_default();
                (StatusCode::OK, "application/json", body)
            }
            (_, "/metrics" | "/healthz" | "/status") => (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                b"GET only\n".to_vec(),
            ),
            _ => (StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
        };
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body)
            .unwrap_or_default()
    }
}
