//! What kind of request this is: a stream (a WebSocket upgrade, counted), a
//! plain request, or an upgrade to some other protocol that wsgate does not
//! carry as a stream.
//!
//! Pingora treats any HTTP/1.1 request with an `Upgrade` header as an upgrade
//! and tunnels it after a 101. Every such request must therefore be either a
//! counted stream or have its `Upgrade` header removed: never an uncounted
//! tunnel.

use http::{header, HeaderMap, Version};
use pingora::http::RequestHeader;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Not an upgrade; passes through uncounted.
    Plain,
    /// `Upgrade` names `websocket` (any case, among other tokens): counted.
    /// A missing `upgrade` token in `Connection` does not exempt it, since
    /// Pingora would still tunnel it.
    Stream,
    /// An HTTP/1.1 upgrade to anything else (e.g. `h2c`): the `Upgrade`
    /// header is removed and the request proxied as plain HTTP.
    OtherUpgrade,
}

pub fn classify(req: &RequestHeader) -> Kind {
    classify_parts(req.version, &req.headers)
}

fn classify_parts(version: Version, headers: &HeaderMap) -> Kind {
    if version != Version::HTTP_11 || !headers.contains_key(header::UPGRADE) {
        return Kind::Plain;
    }
    let websocket = headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| {
            let token = token.trim();
            // A protocol may carry a version: `websocket/13`.
            let name = token.split('/').next().unwrap_or(token);
            name.eq_ignore_ascii_case("websocket")
        });
    if websocket {
        Kind::Stream
    } else {
        Kind::OtherUpgrade
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(version: Version, pairs: &[(&'static str, &'static str)]) -> Kind {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        classify_parts(version, &h)
    }

    #[test]
    fn every_spelling_of_a_websocket_upgrade_is_a_stream() {
        let v11 = Version::HTTP_11;
        for pairs in [
            &[("upgrade", "websocket"), ("connection", "Upgrade")][..],
            &[
                ("upgrade", "WebSocket"),
                ("connection", "keep-alive, upgrade"),
            ],
            &[("upgrade", "WEBSOCKET"), ("connection", "UPGRADE")],
            &[("upgrade", "foo, websocket"), ("connection", "upgrade")],
            &[
                ("upgrade", "h2c"),
                ("upgrade", "websocket"),
                ("connection", "upgrade"),
            ],
            // No Connection token: Pingora would still tunnel it, so count it.
            &[("upgrade", "websocket")],
        ] {
            assert_eq!(kind(v11, pairs), Kind::Stream, "{pairs:?}");
        }
    }

    #[test]
    fn plain_and_other_upgrades() {
        assert_eq!(kind(Version::HTTP_11, &[]), Kind::Plain);
        assert_eq!(
            kind(Version::HTTP_11, &[("connection", "upgrade")]),
            Kind::Plain
        );
        assert_eq!(
            kind(Version::HTTP_10, &[("upgrade", "websocket")]),
            Kind::Plain
        );
        assert_eq!(
            kind(
                Version::HTTP_11,
                &[
                    ("upgrade", "h2c"),
                    ("connection", "Upgrade, HTTP2-Settings")
                ]
            ),
            Kind::OtherUpgrade
        );
        assert_eq!(
            kind(Version::HTTP_11, &[("upgrade", "websockets")]),
            Kind::OtherUpgrade
        );
    }
}
