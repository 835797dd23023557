//! A connection's first request, when it is a WebSocket upgrade in its
//! plainest form: read, routed, admitted and carried to its 101 by the
//! front door on the raw connections, without Pingora's HTTP sessions.
//!
//! An upgrade is one exchange of heads, after which the connection is a
//! byte relay. Pingora's server session, proxy pipeline, connection pool and
//! client session cost more CPU per upgrade than everything wsgate itself
//! does (docs/benchmarks.md); here the head is parsed once, in place, by the
//! parser Pingora uses (`httparse`), and the upstream's answer head is
//! passed on rebuilt from its fields, as Pingora would pass it.
//!
//! What is taken here is narrow on purpose: the first read must hold the
//! whole head, and the head must be an HTTP/1.1 `GET` with a valid
//! origin-form target and no fragment, one plain `Host`, no body framing and
//! `Upgrade: websocket`, to a route that exists. Anything else, every
//! malformed head included, is given back unread to Pingora, which answers
//! it as it always has; so is every later request on a kept-alive
//! connection. Both ways share admission, the upstream peer and the record
//! of how a stream ended ([`stream`](crate::stream)).

use crate::conn::Handoff;
use crate::gateway::Gateway;
use crate::metrics::UpstreamFailure;
use crate::refusal;
use crate::relay::{
    connect_failed, failure_status, Bounds, End, Outcome, Upgraded, CLOSE_GRACE, REFUSAL_LIMIT,
};
use crate::request::{self, Kind};
use crate::route::normalize_path;
use crate::stream;
use bytes::{Buf, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Version};
use pingora::connectors::TransportConnector;
use pingora::http::ResponseHeader;
use pingora::protocols::Stream;
use pingora::{Error, ErrorType};
use std::borrow::Cow;
use std::io;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant as TokioInstant;

/// The most of a head the first read takes. Browsers' upgrade heads are
/// well under it; a larger one (many cookies) goes through Pingora.
const FIRST_READ: usize = 4096;

/// Headers a head taken here may carry; one with more goes through Pingora.
const MAX_HEADERS: usize = 64;

/// The largest upstream answer head read before the upgrade counts as
/// failed: Pingora's own bound.
const MAX_ANSWER_HEAD: usize = 1_048_575;

/// Fields an upstream answer may carry.
const MAX_ANSWER_FIELDS: usize = 256;

/// What became of a connection's first request.
pub enum First {
    /// Not taken here: `read` holds what was read, for Pingora to read
    /// first.
    Declined { client: Stream, read: Vec<u8> },
    /// Answered and closed here, or the client went away.
    Done,
    /// Upgraded: the stream is ready to be relayed.
    Upgraded {
        client: Stream,
        handoff: Box<Handoff>,
    },
}

/// Reads a new connection's first request and carries it if it is an
/// upgrade this path takes. The read waits until `deadline` (the head's);
/// a head not in by then is declined, and Pingora's head bound closes the
/// connection as it would have.
pub async fn first(
    gateway: &Gateway,
    transport: &TransportConnector,
    mut client: Stream,
    peer: Option<IpAddr>,
    deadline: TokioInstant,
    max_head: usize,
) -> First {
    let mut buf = [0u8; FIRST_READ];
    let limit = FIRST_READ.min(max_head);
    let n = match tokio::time::timeout_at(deadline, client.read(&mut buf[..limit])).await {
        Ok(Ok(0) | Err(_)) => return First::Done,
        Ok(Ok(n)) => n,
        Err(_) => {
            return First::Declined {
                client,
                read: Vec::new(),
            }
        }
    };
    let read = &buf[..n];
    let decline = |client| First::Declined {
        client,
        read: read.to_vec(),
    };

    let (Some(peer), Some(head)) = (peer, Head::parse(read)) else {
        return decline(client);
    };
    let snapshot = gateway.snapshot();
    let Some(found) = snapshot.config.router.find(Some(head.host), &head.path) else {
        return decline(client);
    };
    let live = &snapshot.routes[found.route];
    let key = found.key.as_deref();

    let admitted = match stream::admit(gateway, &snapshot, live, key, peer, &head.headers).await {
        Ok(admitted) => admitted,
        Err(scope) => {
            let route = &live.route;
            let wait = refusal::retry_after(route.retry_after, route.retry_after_jitter);
            let (answer, body) = refusal::response(route.reject_status, wait, &route.name, scope);
            let mut out = head_bytes(&answer);
            out.extend_from_slice(&body);
            answer_and_close(&mut client, &out).await;
            return First::Done;
        }
    };

    let route = &live.route;
    let bounds = Bounds {
        handshake_timeout: route.upstream.handshake_timeout,
        idle_timeout: route.idle_timeout,
        deadline: route.max_lifetime.map(|d| Instant::now() + d),
    };
    let request = head.upstream_request(route.upstream.host_header.as_deref());
    let exchange = match stream::peer_for(live, &snapshot.config).await {
        Ok(peer) => exchange(transport, &peer, &request, bounds.handshake_timeout).await,
        // The name did not resolve: nothing was sent, so a refused connection.
        Err(e) => Err((UpstreamFailure::Refused, e)),
    };

    let outcome = match exchange {
        Ok(answer) if answer.head.status == 101 => {
            let mut admitted = admitted;
            if write_all(&mut client, &answer.head.passed).await.is_err() {
                Outcome::Ended(End::ClientError)
            } else {
                admitted.upgraded(Instant::now());
                let handoff = Box::new(Handoff {
                    upgraded: Upgraded {
                        upstream: answer.upstream,
                        to_upstream: read[head.len..].to_vec(),
                        to_client: answer.rest.to_vec(),
                    },
                    bounds,
                    admitted,
                    route: route.name.clone(),
                });
                return First::Upgraded { client, handoff };
            }
        }
        Ok(answer) => {
            // Not upgraded: the slots go back before the answer is relayed.
            drop(admitted);
            let answered = answer.head.status;
            let pass_on = pass_on(&mut client, answer, bounds);
            let _ = tokio::time::timeout(REFUSAL_LIMIT, pass_on).await;
            close(&mut client).await;
            Outcome::Failed {
                reason: UpstreamFailure::Status,
                answered,
                error: None,
            }
        }
        Err((reason, error)) => {
            drop(admitted);
            let answered = failure_status(reason);
            answer_and_close(&mut client, error_answer(answered).as_bytes()).await;
            Outcome::Failed {
                reason,
                answered,
                error: Some(error),
            }
        }
    };
    stream::record(gateway, live, outcome);
    First::Done
}

/// A request head this path takes, parsed in place.
#[derive(Debug)]
struct Head<'b> {
    /// The head's length in bytes, blank line included.
    len: usize,
    /// The path as routed and counted: normalised, percent-encoding kept.
    path: Cow<'b, str>,
    query: Option<&'b str>,
    host: &'b str,
    /// The fields as they came, names in their own case, for the upstream.
    fields: Vec<(&'b str, &'b [u8])>,
    /// The same fields, for classification and client identity.
    headers: HeaderMap,
}

impl<'b> Head<'b> {
    /// Parses `read` if it holds a whole head of the kind taken here.
    fn parse(read: &'b [u8]) -> Option<Self> {
        let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut raw);
        let httparse::Status::Complete(len) = req.parse(read).ok()? else {
            return None;
        };
        if req.method? != "GET" || req.version? != 1 {
            return None;
        }
        // Origin form only: an absolute URI names its own authority, which
        // Pingora checks against Host; those go its way. So does a target
        // that is not a valid URI path (Pingora answers 400) or that has a
        // fragment (Pingora drops it before routing).
        let target = req.path?;
        if !target.starts_with('/')
            || target.contains('#')
            || http::uri::PathAndQuery::try_from(target).is_err()
        {
            return None;
        }
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (target, None),
        };

        let mut fields = Vec::with_capacity(req.headers.len());
        let mut headers = HeaderMap::with_capacity(req.headers.len());
        for field in req.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
            let value = HeaderValue::from_bytes(field.value).ok()?;
            headers.append(name, value);
            fields.push((field.name, field.value));
        }
        // Body framing of any kind, even a zero length, and a missing,
        // repeated or unusual Host (userinfo, or bytes that are not visible
        // ASCII) are Pingora's to judge.
        let mut hosts = fields
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("host"));
        let host = hosts.next()?.1;
        let visible = |b: &u8| *b == b'\t' || (0x20..0x7f).contains(b);
        if !host.iter().all(visible)
            || host.contains(&b'@')
            || hosts.next().is_some()
            || headers.contains_key(http::header::CONTENT_LENGTH)
            || headers.contains_key(http::header::TRANSFER_ENCODING)
        {
            return None;
        }
        if request::classify_parts(&Method::GET, Version::HTTP_11, &headers) != Kind::Stream {
            return None;
        }

        Some(Self {
            len,
            path: normalize_path(path),
            query,
            host: std::str::from_utf8(host).ok()?,
            fields,
            headers,
        })
    }

    /// The head sent upstream: the path as it was matched and counted, the
    /// fields as they came, and the route's Host if it sets one.
    fn upstream_request(&self, host_header: Option<&str>) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len + 64);
        out.extend_from_slice(b"GET ");
        out.extend_from_slice(self.path.as_bytes());
        if let Some(query) = self.query {
            out.push(b'?');
            out.extend_from_slice(query.as_bytes());
        }
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in &self.fields {
            match host_header {
                Some(host) if name.eq_ignore_ascii_case("host") => {
                    field(&mut out, name, host.as_bytes());
                }
                _ => field(&mut out, name, value),
            }
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

fn field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The upstream's final answer to the upgrade, interim answers skipped.
struct Answer {
    upstream: Stream,
    head: AnswerHead,
    /// Whatever the upstream sent after the head.
    rest: BytesMut,
}

/// A whole answer head, read once.
#[derive(Debug)]
struct AnswerHead {
    status: u16,
    /// Its length in the upstream's bytes.
    len: usize,
    /// As it is passed on (empty for an interim answer, which is not).
    passed: Vec<u8>,
    /// How its body ends (`Empty` for a 101, whose bytes after the head
    /// are the stream's).
    framing: Framing,
}

/// Connects to `peer`, sends `request` and reads the answer head, all
/// within `timeout` once connected (connecting has its own bound).
async fn exchange(
    transport: &TransportConnector,
    peer: &pingora::prelude::HttpPeer,
    request: &[u8],
    timeout: Duration,
) -> Result<Answer, (UpstreamFailure, Box<Error>)> {
    // Boxed: Pingora's connect future is over 8 KB (it holds every TLS
    // path), and inline it would be copied with each enclosing future.
    let mut upstream = Box::pin(transport.new_stream(peer))
        .await
        .map_err(connect_failed)?;

    let talk = async {
        write_all(&mut upstream, request).await?;
        let mut buf = BytesMut::with_capacity(1024);
        loop {
            if let Some(head) = parse_answer(&buf)? {
                buf.advance(head.len);
                if is_interim(head.status) {
                    continue;
                }
                return Ok((head, buf));
            }
            if buf.len() >= MAX_ANSWER_HEAD {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "upstream answer head too large",
                ));
            }
            if upstream.read_buf(&mut buf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "upstream closed before answering the upgrade",
                ));
            }
        }
    };
    match tokio::time::timeout(timeout, talk).await {
        Ok(Ok((head, rest))) => Ok(Answer {
            upstream,
            head,
            rest,
        }),
        Ok(Err(e)) => Err((
            UpstreamFailure::Closed,
            Error::because(ErrorType::ReadError, "upstream upgrade exchange", e),
        )),
        Err(_) => Err((
            UpstreamFailure::Timeout,
            Error::explain(
                ErrorType::ReadTimedout,
                "upstream did not answer the upgrade in time",
            ),
        )),
    }
}

/// Interim answers (100 Continue, 103 Early Hints) come before the real
/// one and mean nothing to a WebSocket client: they are skipped.
fn is_interim(status: u16) -> bool {
    matches!(status, 100 | 102..=199)
}

/// The complete answer head at the start of `buf`, `None` if it is not all
/// there yet. As in Pingora's client, a status under 100, a switch over
/// HTTP/1.0 (which cannot switch), or lengths no reader could rely on, on
/// any answer, are errors: the upgrade fails.
fn parse_answer(buf: &[u8]) -> io::Result<Option<AnswerHead>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut raw = [httparse::EMPTY_HEADER; MAX_ANSWER_FIELDS];
    let mut resp = httparse::Response::new(&mut raw);
    let len = match answer_parser().parse_response(&mut resp, buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(bad(&format!("upstream answer: {e}"))),
    };
    let status = resp
        .code
        .ok_or_else(|| bad("upstream answer without a status"))?;
    if status < 100 {
        return Err(bad("upstream answer status under 100"));
    }
    if status == 101 && resp.version != Some(1) {
        return Err(bad("upstream answered 101 without upgrading"));
    }
    let lengths = resp
        .headers
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("content-length"));
    let length = content_length(lengths.map(|f| f.value))?;

    let (passed, framing) = if is_interim(status) {
        (Vec::new(), Framing::Empty)
    } else {
        answer_head(&resp, status, length)
    };
    Ok(Some(AnswerHead {
        status,
        len,
        passed,
        framing,
    }))
}

/// How upstream answers are read: with the allowances Pingora's client
/// makes (a space before a field's colon, folded fields), which the head
/// passed on then no longer has.
fn answer_parser() -> httparse::ParserConfig {
    let mut config = httparse::ParserConfig::default();
    config
        .allow_spaces_after_header_name_in_responses(true)
        .allow_obsolete_multiline_headers_in_responses(true);
    config
}

/// How the body of an upstream's non-101 answer ends.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

/// Rebuilds a final answer head from its fields, as a proxy must pass it
/// on: a folded field unfolded and nothing between a name and its colon
/// (RFC 9112, 5.1-5.2). Any answer but a 101 closes the client's
/// connection: it loses the upstream's `Connection` and `Keep-Alive`, gains
/// `Connection: close`, and its body's framing is read, `Transfer-Encoding`
/// winning over `length` (whose field is then not passed on).
fn answer_head(resp: &httparse::Response, status: u16, length: Option<u64>) -> (Vec<u8>, Framing) {
    let closing = status != 101;
    let is = |f: &httparse::Header, name: &str| f.name.eq_ignore_ascii_case(name);

    let coded = resp.headers.iter().any(|f| is(f, "transfer-encoding"));
    let framing = if !closing || matches!(status, 204 | 304) {
        Framing::Empty
    } else if coded {
        // Chunked must be the last coding of the last field; otherwise the
        // body runs to the close (RFC 9112, 6.3).
        let last = resp
            .headers
            .iter()
            .rev()
            .find(|f| is(f, "transfer-encoding"))
            .and_then(|f| f.value.rsplit(|b| *b == b',').next())
            .unwrap_or(b"");
        if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked(Chunked::default())
        } else {
            Framing::UntilClose
        }
    } else {
        length.map_or(Framing::UntilClose, Framing::Length)
    };

    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(format!("HTTP/1.1 {status} ").as_bytes());
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for f in resp.headers.iter() {
        let hop = is(f, "connection") || is(f, "keep-alive");
        if closing && (hop || (coded && is(f, "content-length"))) {
            continue;
        }
        let value: Cow<[u8]> = if f.value.iter().any(|b| matches!(b, b'\r' | b'\n')) {
            let unfolded = f
                .value
                .iter()
                .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b });
            Cow::Owned(unfolded.collect())
        } else {
            Cow::Borrowed(f.value)
        };
        field(&mut out, f.name, &value);
    }
    if closing {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (out, framing)
}

/// The body length the `Content-Length` fields give, if any: every value
/// (a field may list several, comma-separated) must be the same number.
fn content_length<'a>(values: impl Iterator<Item = &'a [u8]>) -> io::Result<Option<u64>> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "bad content-length in upstream answer",
        )
    };
    let mut length = None;
    for item in values.flat_map(|v| v.split(|b| *b == b',')) {
        let item = item.trim_ascii();
        if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
            return Err(bad());
        }
        let n: u64 = std::str::from_utf8(item)
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(bad)?;
        if length.is_some_and(|l| l != n) {
            return Err(bad());
        }
        length = Some(n);
    }
    Ok(length)
}

/// Relays an upstream's non-101 answer to the client, its head then its
/// body as its framing bounds it; the client's connection ends after it.
/// Each read from the upstream is bounded by the handshake timeout.
async fn pass_on(client: &mut Stream, answer: Answer, bounds: Bounds) -> io::Result<()> {
    let Answer {
        mut upstream,
        head,
        rest: mut buf,
    } = answer;
    let mut framing = head.framing;
    write_all(client, &head.passed).await?;

    loop {
        let take = match &mut framing {
            Framing::Empty => return Ok(()),
            Framing::Length(left) => {
                let take = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= take as u64;
                take
            }
            Framing::Chunked(chunked) => chunked.feed(&buf),
            Framing::UntilClose => buf.len(),
        };
        if take > 0 {
            write_all(client, &buf[..take]).await?;
        }
        let done = match &framing {
            Framing::Length(left) => *left == 0,
            Framing::Chunked(chunked) if chunked.is_bad() => {
                // What was whole went out; the client sees the body cut.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad chunked framing in upstream answer",
                ));
            }
            Framing::Chunked(chunked) => chunked.is_done(),
            _ => false,
        };
        if done {
            return Ok(());
        }
        // What a chunk line still lacks stays; the rest went out.
        buf.advance(take);
        if buf.len() > MAX_ANSWER_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "upstream chunk line too long",
            ));
        }
        let read = upstream.read_buf(&mut buf);
        match tokio::time::timeout(bounds.handshake_timeout, read).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Ok(()),
            Ok(Ok(_)) => {}
        }
    }
}

/// Follows a chunked body's framing over the raw bytes, so the body can be
/// passed on as it came and its end found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Chunked {
    state: ChunkState,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk's data, this much left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until a blank one.
    Trailer,
    Done,
    /// The framing broke; nothing after it is passed on.
    Bad,
}

impl Chunked {
    /// Follows `buf` as far as it can; returns how many bytes of it are
    /// settled (to be passed on). The rest is an incomplete line, or what
    /// follows a break in the framing (see [`is_bad`](Self::is_bad)).
    fn feed(&mut self, buf: &[u8]) -> usize {
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            match self.state {
                ChunkState::Done | ChunkState::Bad => return at,
                ChunkState::Size => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((used, 0))) => {
                        at += used;
                        self.state = ChunkState::Trailer;
                    }
                    Ok(httparse::Status::Complete((used, size))) => {
                        at += used;
                        self.state = ChunkState::Data(size);
                    }
                    Ok(httparse::Status::Partial) => return at,
                    Err(_) => self.state = ChunkState::Bad,
                },
                ChunkState::Data(left) => {
                    if rest.is_empty() {
                        return at;
                    }
                    let take = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    at += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::DataEnd => {
                    if rest.len() < 2 {
                        return at;
                    }
                    if &rest[..2] == b"\r\n" {
                        at += 2;
                        self.state = ChunkState::Size;
                    } else {
                        self.state = ChunkState::Bad;
                    }
                }
                ChunkState::Trailer => {
                    let Some(eol) = rest.iter().position(|b| *b == b'\n') else {
                        return at;
                    };
                    let line = &rest[..eol];
                    at += eol + 1;
                    if line.is_empty() || line == b"\r" {
                        self.state = ChunkState::Done;
                    }
                }
            }
        }
    }

    fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    fn is_bad(&self) -> bool {
        self.state == ChunkState::Bad
    }
}

/// A response head as bytes, for answers wsgate makes itself.
fn head_bytes(head: &ResponseHeader) -> Vec<u8> {
    let status = head.status;
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
        .as_bytes(),
    );
    for (name, value) in head.headers.iter() {
        field(&mut out, name.as_str(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// wsgate's own answer when the upstream failed the upgrade.
fn error_answer(status: u16) -> String {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\n\
         Cache-Control: private, no-store\r\nConnection: close\r\n\r\n"
    )
}

async fn write_all(to: &mut Stream, bytes: &[u8]) -> io::Result<()> {
    to.write_all(bytes).await?;
    to.flush().await
}

/// Sends a whole answer and closes the connection in order.
async fn answer_and_close(client: &mut Stream, answer: &[u8]) {
    let send = write_all(client, answer);
    if tokio::time::timeout(REFUSAL_LIMIT, send).await.is_ok() {
        close(client).await;
    }
}

async fn close(client: &mut Stream) {
    let _ = tokio::time::timeout(CLOSE_GRACE, client.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection's task holds this future while its head is read
    /// and its upgrade carried, so a burst of handshakes holds it once per
    /// connection. Pingora's connect future (every TLS path) and the
    /// fleet's Redis admission are boxed to keep them out of it; inline,
    /// they more than doubled it.
    #[tokio::test]
    async fn a_connections_handshake_future_stays_small() {
        let yaml = "listen:\n  - address: 127.0.0.1:0\n\
            admin:\n  address: 127.0.0.1:0\n\
            routes:\n  - name: ws\n    prefix: /\n    upstream: { url: \"http://127.0.0.1:9\" }\n";
        let config = crate::config::parse(std::path::Path::new("t.yaml"), yaml).unwrap();
        let gateway = Gateway::new(config).unwrap();
        let transport = TransportConnector::new(None);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let stream: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(client));

        let handshake = first(
            &gateway,
            &transport,
            stream,
            None,
            TokioInstant::now(),
            1024,
        );
        let size = std::mem::size_of_val(&handshake);
        assert!(size <= 8 * 1024, "the handshake future is {size} bytes");
    }

    const UPGRADE: &str = "GET /rooms/a%21/ws?x=1 HTTP/1.1\r\nHost: chat.example\r\n\
        Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: abc\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn a_plain_websocket_upgrade_is_taken_and_sent_on_as_it_came() {
        let mut read = UPGRADE.as_bytes().to_vec();
        read.extend_from_slice(b"\x81\x00");
        let head = Head::parse(&read).expect("taken");
        assert_eq!(head.len, UPGRADE.len());
        assert_eq!(head.host, "chat.example");
        assert_eq!(head.path, "/rooms/a%21/ws");
        assert_eq!(head.upstream_request(None), UPGRADE.as_bytes());

        let sent = head.upstream_request(Some("origin.internal"));
        let sent = String::from_utf8(sent).unwrap();
        assert!(sent.starts_with("GET /rooms/a%21/ws?x=1 HTTP/1.1\r\n"));
        assert_eq!(
            sent,
            UPGRADE.replace("Host: chat.example", "Host: origin.internal")
        );
    }

    #[test]
    fn the_path_goes_upstream_as_it_was_counted() {
        let read = UPGRADE.replace("/rooms/a%21/ws", "/rooms/./a%21//ws");
        let head = Head::parse(read.as_bytes()).expect("taken");
        let sent = String::from_utf8(head.upstream_request(None)).unwrap();
        assert!(
            sent.starts_with("GET /rooms/a%21/ws?x=1 HTTP/1.1\r\n"),
            "{sent}"
        );
    }

    #[test]
    fn every_other_head_is_left_to_pingora() {
        let cases = [
            // Not all there yet.
            UPGRADE.trim_end_matches("\r\n").to_string(),
            UPGRADE.replace("GET", "POST"),
            UPGRADE.replace("HTTP/1.1", "HTTP/1.0"),
            UPGRADE.replace("GET /rooms", "GET http://chat.example/rooms"),
            UPGRADE.replace("Host: chat.example\r\n", ""),
            UPGRADE.replace("Host: chat.example\r\n", "Host: a\r\nHost: b\r\n"),
            UPGRADE.replace("Upgrade: websocket", "Upgrade: h2c"),
            UPGRADE.replace("Upgrade: websocket\r\n", ""),
            UPGRADE.replace("\r\n\r\n", "\r\nContent-Length: 0\r\n\r\n"),
            UPGRADE.replace("\r\n\r\n", "\r\nTransfer-Encoding: chunked\r\n\r\n"),
            UPGRADE.replace("Host:", "Ho st:"),
            UPGRADE.replace("chat.example", "user@chat.example"),
            UPGRADE.replace("chat.example", "ééé.example"),
            UPGRADE.replace("?x=1", "#frag"),
            UPGRADE.replace("?x=1", "?x=1#frag"),
            UPGRADE.replace("/ws?", "/<ws>?"),
            UPGRADE.replace("/ws?", "/w`s?"),
            "not http at all\r\n\r\n".to_string(),
        ];
        for read in cases {
            assert!(Head::parse(read.as_bytes()).is_none(), "{read:?}");
        }
        let many: String = (0..MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
        let read = UPGRADE.replace("\r\n\r\n", &format!("\r\n{many}\r\n"));
        assert!(Head::parse(read.as_bytes()).is_none());
    }

    #[test]
    fn interim_and_final_answers_are_told_apart() {
        let switch = parse_answer(b"HTTP/1.1 101 Switching Protocols\r\n\r\nxy")
            .unwrap()
            .unwrap();
        assert_eq!((switch.status, switch.len), (101, 36));
        let hints = parse_answer(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(is_interim(hints.status) && hints.passed.is_empty());
        assert!(parse_answer(b"HTTP/1.1 101 Switching").unwrap().is_none());
        for bad in [
            &b"NOPE\r\n\r\n"[..],
            b"HTTP/1.1 099 Weird\r\n\r\n",
            b"HTTP/1.0 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nContent-Length: abc\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nContent-Length: +1\r\n\r\n",
        ] {
            assert!(
                parse_answer(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_refused_upgrades_answer_keeps_its_fields_and_closes() {
        let head = |raw: &[u8]| match parse_answer(raw) {
            Ok(Some(head)) => (String::from_utf8(head.passed).unwrap(), Some(head.framing)),
            _ => (String::new(), None),
        };
        let raw = b"HTTP/1.1 403 Forbidden\r\nConnection: keep-alive\r\nKeep-Alive: t=5\r\n\
            Content-Length: 4\r\nX-Why: no\r\n\r\n";
        assert_eq!(
            head(raw),
            (
                "HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\nX-Why: no\r\nConnection: close\r\n\r\n"
                    .to_string(),
                Some(Framing::Length(4))
            )
        );

        // Transfer-Encoding wins wherever it stands; the length is dropped.
        for raw in [
            &b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 9\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad\r\nContent-Length: 9\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        ] {
            let (text, framing) = head(raw);
            assert!(!text.contains("Content-Length"), "{text}");
            assert_eq!(framing, Some(Framing::Chunked(Chunked::default())));
        }
        let raw = b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked, gzip\r\n\r\n";
        assert_eq!(head(raw).1, Some(Framing::UntilClose));
        let raw = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n";
        assert_eq!(head(raw).1, Some(Framing::Empty));
        let raw = b"HTTP/1.1 500 Oops\r\n\r\n";
        assert_eq!(head(raw).1, Some(Framing::UntilClose));
        let raw = b"HTTP/1.1 500 Oops\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(head(raw).1, Some(Framing::Length(3)));

        // Lengths no client could rely on.
        for cl in ["5\r\nContent-Length: 7", "+5", "5, 6", "", "five", "-1"] {
            let raw = format!("HTTP/1.1 403 No\r\nContent-Length: {cl}\r\n\r\n");
            assert_eq!(head(raw.as_bytes()).1, None, "{cl}");
        }
    }

    #[test]
    fn a_switch_is_passed_on_with_its_fields_unfolded() {
        let raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nX-Foo : bar\r\nX-Long: a\r\n b\r\n\r\n";
        let switch = parse_answer(raw).unwrap().unwrap();
        assert_eq!((switch.status, switch.len), (101, raw.len()));
        assert_eq!(switch.framing, Framing::Empty);
        assert_eq!(
            String::from_utf8(switch.passed).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nX-Foo: bar\r\nX-Long: a   b\r\n\r\n"
        );
    }

    #[test]
    fn a_chunked_body_ends_where_its_framing_says_across_any_split() {
        let body = b"4\r\nwiki\r\n5;ext=1\r\npedia\r\n0\r\nTrailer: x\r\n\r\n";
        for split in 0..=body.len() {
            let mut chunked = Chunked::default();
            let mut pending = body[..split].to_vec();
            let mut passed = 0;
            let used = chunked.feed(&pending);
            passed += used;
            pending.drain(..used);
            pending.extend_from_slice(&body[split..]);
            passed += chunked.feed(&pending);
            assert!(chunked.is_done(), "split at {split}");
            assert_eq!(passed, body.len(), "split at {split}");
        }

        // Bytes after the end are not part of the answer.
        let mut chunked = Chunked::default();
        assert_eq!(chunked.feed(b"0\r\n\r\nextra"), 5);
        assert!(chunked.is_done());

        // A break keeps what was whole before it, and passes nothing after.
        for (bytes, settled) in [
            (&b"zz\r\n"[..], 0),
            (b"1\r\nabc", 4),
            (b"4\r\nwiki\r\nzz\r\n4\r\nmore\r\n", 9),
        ] {
            let mut chunked = Chunked::default();
            assert_eq!(chunked.feed(bytes), settled, "{bytes:?}");
            assert!(chunked.is_bad() && !chunked.is_done());
            assert_eq!(chunked.feed(b"0\r\n\r\n"), 0);
        }
    }

    #[test]
    fn wsgates_own_answers_are_whole_heads() {
        let answer = error_answer(502);
        assert!(answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(answer.ends_with("Connection: close\r\n\r\n"));

        let (head, _) = refusal::response(
            http::StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(2),
            "chat",
            crate::admission::Scope::Route,
        );
        let bytes = String::from_utf8(head_bytes(&head)).unwrap();
        assert!(bytes.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(bytes.contains("retry-after: 2\r\n"));
        assert!(bytes.ends_with("\r\n\r\n"));
    }
}
