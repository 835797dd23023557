//! What kind of request this is: a stream (a WebSocket upgrade, counted), a
//! plain request, or an upgrade to some other protocol that wsgate does not
//! carry as a stream.
//!
//! Pingora treats any HTTP/1.1 request with an `Upgrade` header as an upgrade
//! and tunnels it after a 101. Every such request must therefore be either a
//! counted stream or have its `Upgrade` header removed: never an uncounted
//! tunnel.

use http::{header, HeaderMap, Method, Version};
use pingora::http::RequestHeader;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Not an upgrade; passes through uncounted.
    Plain,
    /// `Upgrade` names `websocket` (any case, among other tokens): counted.
    /// A missing `upgrade` token in `Connection` does not exempt it, since
    /// Pingora would still tunnel it.
    Stream,
    /// An HTTP/1.1 upgrade to anything else (e.g. `h2c`), or any `Upgrade`
    /// header on HTTP/1.0, which cannot upgrade: the `Upgrade` header is
    /// removed and the request proxied as plain HTTP.
    OtherUpgrade,
    /// A WebSocket upgrade in a form wsgate will not carry: answered 400.
    BadUpgrade(&'static str),
}

pub fn classify(req: &RequestHeader) -> Kind {
    classify_parts(&req.method, req.version, &req.headers)
}

pub(crate) fn classify_parts(method: &Method, version: Version, headers: &HeaderMap) -> Kind {
    if !headers.contains_key(header::UPGRADE) {
        return Kind::Plain;
    }
    // Pingora sends HTTP/1.0 requests upstream as HTTP/1.1, where the
    // header would ask for a switch the client cannot take.
    if version != Version::HTTP_11 {
        return Kind::OtherUpgrade;
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
    if !websocket {
        return Kind::OtherUpgrade;
    }
    // RFC 6455 upgrades are GETs without a body. Anything else is refused
    // rather than tunnelled: a body would have to reach the upstream before
    // the switch, and other methods are not WebSocket handshakes.
    if method != Method::GET {
        return Kind::BadUpgrade("a WebSocket upgrade must be a GET");
    }
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return Kind::BadUpgrade("a WebSocket upgrade must not carry a body");
    }
    Kind::Stream
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(version: Version, pairs: &[(&'static str, &'static str)]) -> Kind {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        classify_parts(&Method::GET, version, &h)
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
            Kind::OtherUpgrade
        );
        assert_eq!(kind(Version::HTTP_10, &[]), Kind::Plain);
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

    #[test]
    fn upgrades_with_other_methods_or_a_body_are_refused() {
        let mut h = HeaderMap::new();
        h.insert("upgrade", "websocket".parse().unwrap());
        let v11 = Version::HTTP_11;
        assert!(matches!(
            classify_parts(&Method::POST, v11, &h),
            Kind::BadUpgrade(_)
        ));
        assert!(matches!(
            classify_parts(&Method::CONNECT, v11, &h),
            Kind::BadUpgrade(_)
        ));
        h.insert("content-length", "0".parse().unwrap());
        assert_eq!(classify_parts(&Method::GET, v11, &h), Kind::Stream);
        h.insert("content-length", "5".parse().unwrap());
        assert!(matches!(
            classify_parts(&Method::GET, v11, &h),
            Kind::BadUpgrade(_)
        ));
        h.remove("content-length");
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        assert!(matches!(
            classify_parts(&Method::GET, v11, &h),
            Kind::BadUpgrade(_)
        ));
    }

    /// Fuzzing of request-head handling: whatever the method, version and
    /// headers, classification, path normalisation, routing and client
    /// identification answer without panicking. Deeper runs:
    /// `PROPTEST_CASES=200000 cargo test --release --lib fuzz`.
    mod fuzz {
        use super::*;
        use crate::client::{ClientPolicy, ForwardHeader};
        use crate::route::{normalize_path, Matcher, PathMatch, Pattern, Router};
        use proptest::prelude::*;

        fn header_name() -> impl Strategy<Value = &'static str> {
            prop::sample::select(vec![
                "upgrade",
                "connection",
                "content-length",
                "transfer-encoding",
                "x-forwarded-for",
                "cf-connecting-ip",
                "x-real-ip",
                "host",
            ])
        }

        proptest! {
            #[test]
            fn fuzz_heads_never_panic(
                method in prop::sample::select(vec!["GET", "POST", "CONNECT", "OPTIONS", "BREW"]),
                v10 in any::<bool>(),
                headers in prop::collection::vec((header_name(), prop::collection::vec(any::<u8>(), 0..40)), 0..8),
                path in prop::collection::vec(any::<u8>(), 0..80),
            ) {
                let mut map = HeaderMap::new();
                for (name, value) in headers {
                    if let Ok(v) = http::HeaderValue::from_bytes(&value) {
                        map.append(name, v);
                    }
                }
                let method = Method::from_bytes(method.as_bytes()).unwrap();
                let version = if v10 { Version::HTTP_10 } else { Version::HTTP_11 };
                let _ = classify_parts(&method, version, &map);

                let path = String::from_utf8_lossy(&path);
                let normal = normalize_path(&path);
                let rooms = Pattern::parse("/room/{room}/ws").unwrap();
                let key = rooms.param_index("room");
                let router = Router::new(vec![Matcher { host: Some("*.example.com".into()), path: PathMatch::Pattern(rooms), key }]);
                let host = map.get("host").and_then(|h| h.to_str().ok());
                let _ = router.find(host, &normal);

                for header in [ForwardHeader::XForwardedFor, ForwardHeader::CfConnectingIp, ForwardHeader::XRealIp] {
                    let policy = ClientPolicy {
                        header: Some(header),
                        trusted: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
                        ..Default::default()
                    };
                    let _ = policy.identify("127.0.0.1".parse().unwrap(), &map);
                }
            }
        }
    }
}
