//! Routing: which configured route a request belongs to, and the route key
//! (a named path segment such as the room) it is counted under.
//!
//! Matching runs on the normalised path, so `/room/a/ws`, `//room/./a/ws` and
//! `/room/%61/ws` are one path and one room: no spelling slips past a limit.
//! The query string never takes part.

use std::borrow::Cow;

/// A parsed path pattern: `/room/{room}/ws`, optionally ending in `/*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    segments: Vec<Segment>,
    /// A trailing `*` matches any remaining segments, including none.
    rest: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

/// Why a pattern was refused; the config loader adds file and field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("must start with `/`")]
    NoLeadingSlash,
    #[error("segment `{0}` is not a literal, `{{name}}` or a final `*`")]
    BadSegment(String),
    #[error("segment name `{0}` appears twice")]
    DuplicateParam(String),
}

impl Pattern {
    pub fn parse(src: &str) -> Result<Self, PatternError> {
        let body = src.strip_prefix('/').ok_or(PatternError::NoLeadingSlash)?;
        let mut segments = Vec::new();
        let mut rest = false;
        let parts: Vec<&str> = if body.is_empty() {
            Vec::new()
        } else {
            body.split('/').collect()
        };

        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            if *part == "*" && last {
                rest = true;
            } else if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                let valid =
                    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    return Err(PatternError::BadSegment(part.to_string()));
                }
                if segments.contains(&Segment::Param(name.to_string())) {
                    return Err(PatternError::DuplicateParam(name.to_string()));
                }
                segments.push(Segment::Param(name.to_string()));
            } else if part.is_empty() || part.contains(['{', '}', '*']) {
                return Err(PatternError::BadSegment(part.to_string()));
            } else {
                segments.push(Segment::Literal(
                    normalize_path(&format!("/{part}"))[1..].into(),
                ));
            }
        }
        Ok(Self { segments, rest })
    }

    /// The position among the pattern's parameters of the one called `name`.
    pub fn param_index(&self, name: &str) -> Option<usize> {
        self.params().position(|p| p == name)
    }

    fn params(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Param(p) => Some(p.as_str()),
            Segment::Literal(_) => None,
        })
    }

    /// Matches a normalised path; on success returns the value of parameter
    /// `want` (if any). Parameters never match an empty segment.
    pub fn matches<'p>(&self, path: &'p str, want: Option<usize>) -> Option<Option<&'p str>> {
        let body = path.strip_prefix('/')?;
        let mut parts = body.split('/').filter(|s| !s.is_empty());
        let mut param = 0;
        let mut key = None;

        for segment in &self.segments {
            let part = parts.next()?;
            match segment {
                Segment::Literal(lit) if lit == part => {}
                Segment::Literal(_) => return None,
                Segment::Param(_) => {
                    if want == Some(param) {
                        key = Some(part);
                    }
                    param += 1;
                }
            }
        }

        if !self.rest && parts.next().is_some() {
            return None;
        }
        Some(key)
    }
}

/// How a route matches paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// `/relay` matches `/relay` and everything below `/relay/`, not `/relayed`.
    Prefix(String),
    Pattern(Pattern),
}

impl PathMatch {
    fn matches<'p>(&self, path: &'p str, key: Option<usize>) -> Option<Option<&'p str>> {
        match self {
            PathMatch::Prefix(prefix) => {
                let prefix = prefix.trim_end_matches('/');
                let tail = path.strip_prefix(prefix)?;
                (tail.is_empty() || tail.starts_with('/')).then_some(None)
            }
            PathMatch::Pattern(p) => p.matches(path, key),
        }
    }
}

/// One route's matching rule.
#[derive(Debug, Clone)]
pub struct Matcher {
    /// Lowercase host without port; `*.example.com` matches any subdomain.
    pub host: Option<String>,
    pub path: PathMatch,
    /// Index of the pattern parameter that keys the per-key limit.
    pub key: Option<usize>,
}

/// The routes in config order; the first that matches wins.
#[derive(Debug, Clone, Default)]
pub struct Router {
    matchers: Vec<Matcher>,
}

/// A request's route and, when the route has one, its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched<'p> {
    pub route: usize,
    /// The key segment fully percent-decoded, as the upstream will read it
    /// (`a!`, `a%21` and `%61%21` are one room).
    pub key: Option<Cow<'p, str>>,
}

impl Router {
    pub fn new(matchers: Vec<Matcher>) -> Self {
        Self { matchers }
    }

    /// Finds the route for `host` (from the Host header or URI authority, port
    /// allowed) and an already normalised `path`.
    pub fn find<'p>(&self, host: Option<&str>, path: &'p str) -> Option<Matched<'p>> {
        let host = host.map(strip_port);
        self.matchers.iter().enumerate().find_map(|(i, m)| {
            if let Some(want) = &m.host {
                if !host.is_some_and(|h| host_matches(want, h)) {
                    return None;
                }
            }
            let key = m.path.matches(path, m.key)?;
            Some(Matched {
                route: i,
                key: key.map(decode_all),
            })
        })
    }
}

fn strip_port(host: &str) -> &str {
    if let Some(v6) = host.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

fn host_matches(want: &str, host: &str) -> bool {
    // Compared as bytes: a host is not always ASCII, and a suffix's length
    // need not fall on one of its character boundaries.
    let host = host.trim_end_matches('.').as_bytes();
    match want.strip_prefix("*.") {
        Some(suffix) => {
            let suffix = suffix.as_bytes();
            host.len() > suffix.len() + 1
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                && host[host.len() - suffix.len() - 1] == b'.'
        }
        None => host.eq_ignore_ascii_case(want.as_bytes()),
    }
}

/// Normalises a request path (no query string) so every spelling of a path
/// compares equal:
/// - percent-encoded unreserved characters are decoded, other escapes are
///   kept with uppercase hex (`%2f` stays an escape, never a separator);
/// - empty segments (`//`) are dropped, `.` and `..` resolved; `..` never
///   climbs above the root.
///
/// Borrows when the path is already normal, the common case.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    if is_normal(path) {
        return Cow::Borrowed(path);
    }

    let decoded = decode_unreserved(path);
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }

    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut normal = String::with_capacity(decoded.len() + 1);
    for seg in &out {
        normal.push('/');
        normal.push_str(seg);
    }
    if normal.is_empty() || (trailing && !out.is_empty()) {
        normal.push('/');
    }
    Cow::Owned(normal)
}

fn is_normal(path: &str) -> bool {
    path.starts_with('/')
        && !path.contains(['%', '\\'])
        && !path.contains("//")
        && !path.split('/').any(|s| s == "." || s == "..")
}

/// Decodes every percent-escape of a key segment; bytes that are not UTF-8
/// become U+FFFD, the same for every spelling of them.
fn decode_all(segment: &str) -> Cow<'_, str> {
    if !segment.contains('%') {
        return Cow::Borrowed(segment);
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len() + 1);
    if !path.starts_with('/') {
        out.push('/');
    }
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(c as char);
                } else {
                    out.push('%');
                    out.push(bytes[i + 1].to_ascii_uppercase() as char);
                    out.push(bytes[i + 2].to_ascii_uppercase() as char);
                }
                i += 3;
                continue;
            }
        }
        // A `%` that starts no escape is written as one, so decoding never
        // forms a new escape from what follows (`%%377` must not become `%77`
        // on a second pass): normalising twice changes nothing.
        if bytes[i] == b'%' {
            out.push_str("%25");
            i += 1;
            continue;
        }
        // A backslash is a separator to WHATWG URL parsers, and so to
        // Workers: treat it as one here too, or `/a\\..\\b` would be counted
        // as one path and served as another.
        if bytes[i] == b'\\' {
            out.push('/');
            i += 1;
            continue;
        }
        // Copy one whole UTF-8 character.
        let ch = path[i..].chars().next().unwrap_or('\u{fffd}');
        out.push(ch);
        i += ch.len_utf8().max(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_resolves_every_spelling() {
        let cases = [
            ("/room/a/ws", "/room/a/ws"),
            ("//room//a/ws", "/room/a/ws"),
            ("/room/./a/ws", "/room/a/ws"),
            ("/x/../room/a/ws", "/room/a/ws"),
            ("/../../room/a/ws", "/room/a/ws"),
            ("/room/%61/ws", "/room/a/ws"),
            ("/%72oom/a/%77s", "/room/a/ws"),
            ("/room/%2e%2E/ws", "/ws"),
            ("/room/a%2fb/ws", "/room/a%2Fb/ws"),
            ("/room/a%2Fb/ws", "/room/a%2Fb/ws"),
            ("/a/", "/a/"),
            ("/a/.", "/a/"),
            ("", "/"),
            ("/", "/"),
            ("/..", "/"),
            ("/%", "/%25"),
            ("/%zz", "/%25zz"),
            ("/%%377s", "/%2577s"),
            ("/caf\u{e9}/%41", "/caf\u{e9}/A"),
            ("/room/x\\..\\lobby/ws", "/room/lobby/ws"),
            ("/registry\\ws", "/registry/ws"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_path(input), want, "input {input:?}");
        }
    }

    #[test]
    fn normal_paths_are_borrowed() {
        assert!(matches!(normalize_path("/room/a/ws"), Cow::Borrowed(_)));
    }

    fn router() -> Router {
        let rooms = Pattern::parse("/room/{room}/ws").unwrap();
        let key = rooms.param_index("room");
        Router::new(vec![
            Matcher {
                host: Some("relay.example.com".into()),
                path: PathMatch::Prefix("/registry".into()),
                key: None,
            },
            Matcher {
                host: None,
                path: PathMatch::Pattern(rooms),
                key,
            },
            Matcher {
                host: Some("*.example.com".into()),
                path: PathMatch::Prefix("/".into()),
                key: None,
            },
        ])
    }

    #[test]
    fn routes_match_on_host_and_path_and_extract_the_key() {
        let r = router();
        let m = |h, p| r.find(h, p);
        assert_eq!(m(Some("relay.example.com"), "/registry").unwrap().route, 0);
        assert_eq!(
            m(Some("RELAY.example.com:443"), "/registry/ws")
                .unwrap()
                .route,
            0
        );
        assert_eq!(m(Some("other.example.com"), "/registry").unwrap().route, 2);
        assert_eq!(m(Some("example.com"), "/registryx"), None);
        assert_eq!(m(None, "/registry"), None);
        // Not ASCII: no match and no panic, whatever the byte lengths.
        for host in ["\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}", "x\u{e9}"] {
            assert_eq!(m(Some(host), "/registry"), None, "{host}");
        }
        assert_eq!(m(Some("\u{e9}.example.com"), "/registry").unwrap().route, 2);

        let room = m(None, "/room/lobby/ws").unwrap();
        assert_eq!((room.route, room.key.as_deref()), (1, Some("lobby")));
        assert_eq!(m(None, "/room/lobby/ws/extra"), None);
        assert_eq!(m(None, "/room/ws"), None);
    }

    #[test]
    fn keys_are_decoded_so_every_spelling_is_one_room() {
        let r = router();
        let key = |raw: &str| {
            let path = normalize_path(raw).into_owned();
            r.find(None, &path)
                .and_then(|m| m.key)
                .map(|k| k.into_owned())
        };
        assert_eq!(key("/room/a!/ws"), key("/room/a%21/ws"));
        assert_eq!(key("/room/%61%21/ws").as_deref(), Some("a!"));
        assert_eq!(key("/room/caf\u{e9}/ws"), key("/room/caf%C3%A9/ws"));
        assert_eq!(key("/room/caf%c3%a9/ws").as_deref(), Some("caf\u{e9}"));
    }

    #[test]
    fn pattern_rest_and_errors() {
        let p = Pattern::parse("/api/{v}/*").unwrap();
        assert_eq!(p.matches("/api/1", p.param_index("v")), Some(Some("1")));
        assert_eq!(p.matches("/api/1/a/b", p.param_index("v")), Some(Some("1")));
        assert_eq!(Pattern::parse("room"), Err(PatternError::NoLeadingSlash));
        assert!(matches!(
            Pattern::parse("/a/{}/b"),
            Err(PatternError::BadSegment(_))
        ));
        assert!(matches!(
            Pattern::parse("/a/*/b"),
            Err(PatternError::BadSegment(_))
        ));
        assert!(matches!(
            Pattern::parse("/{a}/{a}"),
            Err(PatternError::DuplicateParam(_))
        ));
    }

    #[test]
    fn every_spelling_of_a_room_is_one_key() {
        let r = router();
        for raw in [
            "/room/lobby/ws",
            "//room/lobby/./ws",
            "/room/%6Cobby/ws",
            "/x/../room/lobby/ws",
        ] {
            let path = normalize_path(raw);
            let m = r.find(None, &path).unwrap();
            assert_eq!(m.key.as_deref(), Some("lobby"), "{raw}");
        }
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// A path segment of unreserved characters, never `.` or `..`.
        fn segment() -> impl Strategy<Value = String> {
            "[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,8}"
        }

        /// Respells a normal path without changing what it names: doubled
        /// slashes, `.` segments, `x/..` detours and percent-escapes of
        /// unreserved characters.
        fn respell(segments: &[String], noise: &[u8]) -> String {
            let mut out = String::new();
            for (i, seg) in segments.iter().enumerate() {
                let n = noise.get(i).copied().unwrap_or(0);
                out.push('/');
                if n & 1 != 0 {
                    out.push_str("/./");
                }
                if n & 2 != 0 {
                    out.push_str("detour/../");
                }
                for (j, c) in seg.chars().enumerate() {
                    if n & 4 != 0 && j % 2 == 0 {
                        out.push_str(&format!("%{:02x}", c as u32));
                    } else {
                        out.push(c);
                    }
                }
            }
            out
        }

        proptest! {
            #[test]
            fn normalisation_is_idempotent_and_clean(raw in "[/a-z.%0-9A-F]{0,40}") {
                let once = normalize_path(&raw).into_owned();
                let twice = normalize_path(&once).into_owned();
                prop_assert_eq!(twice, once.clone());
                prop_assert!(once.starts_with('/'));
                prop_assert!(!once.contains("//"));
                prop_assert!(!once.split('/').any(|s| s == "." || s == ".."));
            }

            #[test]
            fn every_spelling_normalises_to_the_same_path(
                segments in prop::collection::vec(segment(), 1..6),
                noise in prop::collection::vec(any::<u8>(), 6),
            ) {
                let plain = format!("/{}", segments.join("/"));
                let respelt = respell(&segments, &noise);
                prop_assert_eq!(normalize_path(&respelt), normalize_path(&plain));
            }

            #[test]
            fn a_room_is_found_under_any_spelling(
                room in segment(),
                noise in prop::collection::vec(any::<u8>(), 3),
            ) {
                let rooms = Pattern::parse("/room/{room}/ws").unwrap();
                let key = rooms.param_index("room");
                let router = Router::new(vec![Matcher { host: None, path: PathMatch::Pattern(rooms), key }]);
                let segments = ["room".to_string(), room.clone(), "ws".to_string()];
                let path = normalize_path(&respell(&segments, &noise)).into_owned();
                let found = router.find(None, &path);
                let key = found.and_then(|m| m.key).map(|k| k.into_owned());
                prop_assert_eq!(key, Some(room));
            }
        }
    }
}
