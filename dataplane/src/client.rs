//! The client's side of the HTTP stage: the first request's head is read and parsed with
//! httparse. A WebSocket upgrade (GET, HTTP/1.1, no body) is answered by the HTTP stage itself:
//! the 101 goes out in one write and the pair goes to the data plane in the same task. Anything
//! else (plain requests, other versions, bodies, heads httparse or the http types refuse) goes
//! to hyper, with the bytes read so far put back in front of the stream ([`Rewind`]). Written
//! here rather than left to hyper's server, which costs buffers, a oneshot, a spawned task and
//! a boxed upgrade per handshake.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::header;
use hyper::{Method, Request, Uri, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::tls::Stream;

/// What the first request on a connection turned out to be.
#[derive(Debug)]
// One per connection, moved once: boxing the request would cost an allocation per handshake.
#[allow(clippy::large_enum_variant)]
pub enum FirstRequest {
    /// A WebSocket upgrade, answered by the HTTP stage, and the bytes that came after its head.
    Upgrade(Request<()>, BytesMut),
    /// Anything else, for hyper: the bytes read so far, from the request's first byte.
    ForHyper(BytesMut),
    /// The client closed or failed before sending a whole head: nothing to answer.
    Gone(String),
    /// No whole head within the handshake timeout: the connection is closed.
    Stalled(Duration),
}

/// What the first request's head may take (hyper enforces the same on what it parses).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_headers: usize,
    pub max_head_bytes: usize,
    pub timeout: Duration,
}

/// Reads until the first request's head is whole, or until it is clear hyper should have it.
pub async fn read_first(stream: &mut Stream, limits: Limits) -> FirstRequest {
    let reading = async move {
        let mut buffer = BytesMut::with_capacity(4096);
        loop {
            match parse(&mut buffer, limits.max_headers) {
                Parsed::Upgrade(request) => return FirstRequest::Upgrade(request, buffer),
                Parsed::Other => return FirstRequest::ForHyper(buffer),
                // Hyper answers 431 for a head over the limit.
                Parsed::Partial if buffer.len() >= limits.max_head_bytes => {
                    return FirstRequest::ForHyper(buffer);
                }
                Parsed::Partial => {}
            }
            let read = match read_now(stream, &mut buffer) {
                Some(read) => read,
                None => {
                    buffer.reserve(4096);
                    stream.read_buf(&mut buffer).await
                }
            };
            match read {
                Ok(0) if buffer.is_empty() => {
                    return FirstRequest::Gone("closed before sending a request".into());
                }
                // A head cut short: hyper names it.
                Ok(0) => return FirstRequest::ForHyper(buffer),
                Ok(_) => {}
                Err(error) => return FirstRequest::Gone(error.to_string()),
            }
        }
    };
    tokio::time::timeout(limits.timeout, reading)
        .await
        .unwrap_or(FirstRequest::Stalled(limits.timeout))
}

/// A plain client has as a rule sent its request by the time it is accepted: it is read at
/// once rather than after the reactor has reported the socket readable, which costs the task
/// a round through the scheduler. `None` when nothing is there yet, when the stream is TLS, or
/// after the first read (a head that comes in pieces waits for the reactor).
fn read_now(stream: &Stream, buffer: &mut BytesMut) -> Option<io::Result<usize>> {
    let (Stream::Plain(tcp), true) = (stream, buffer.is_empty()) else {
        return None;
    };
    let start = buffer.len();
    buffer.resize(start + 4096, 0);
    let socket = socket2::SockRef::from(tcp);
    let read = io::Read::read(&mut &*socket, &mut buffer[start..]);
    buffer.truncate(start + *read.as_ref().unwrap_or(&0));
    match read {
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            None
        }
        read => Some(read),
    }
}

#[allow(clippy::large_enum_variant)] // as for FirstRequest
enum Parsed {
    /// An upgrade request; its head has left the buffer.
    Upgrade(Request<()>),
    Partial,
    Other,
}

/// The X-Forwarded-* headers the member's copy of the request gains.
const FORWARDED_HEADERS: usize = 3;

/// Parses the head at the start of `buffer`. An upgrade's head is split off the buffer, and
/// its header values are slices of it, not copies.
fn parse(buffer: &mut BytesMut, max_headers: usize) -> Parsed {
    let mut on_stack = [httparse::EMPTY_HEADER; crate::head::STACK_SLOTS];
    let mut on_heap = Vec::new();
    let slots = crate::head::slots(&mut on_stack, &mut on_heap, max_headers);
    let mut parsed = httparse::Request::new(slots);
    let length = match parsed.parse(buffer) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        // Hyper answers a malformed head or one with too many headers.
        Err(_) => return Parsed::Other,
    };
    if parsed.method != Some("GET") || parsed.version != Some(1) {
        return Parsed::Other;
    }
    let Some(Ok(uri)) = parsed.path.map(str::parse::<Uri>) else {
        return Parsed::Other;
    };
    let Ok(fields) = crate::head::fields(parsed.headers, buffer) else {
        return Parsed::Other;
    };
    let head = buffer.split_to(length).freeze();
    let Ok(headers) = crate::head::header_map(&head, fields, FORWARDED_HEADERS) else {
        put_back(head, buffer);
        return Parsed::Other;
    };
    // A body's framing is hyper's to judge.
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|value| value != "0");
    let mut request = Request::new(());
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    if has_body || !crate::http::wants_upgrade(&request) {
        drop(request);
        put_back(head, buffer);
        return Parsed::Other;
    }
    Parsed::Upgrade(request)
}

/// Puts a head split off by `parse` back in front of the buffer, once nothing else holds it
/// (the two are contiguous, so nothing is copied).
fn put_back(head: Bytes, buffer: &mut BytesMut) {
    let mut whole = head
        .try_into_mut()
        .unwrap_or_else(|head| BytesMut::from(&head[..]));
    whole.unsplit(std::mem::take(buffer));
    *buffer = whole;
}

/// A stream with bytes already read from it put back in front, for hyper.
#[derive(Debug)]
pub struct Rewind {
    unread: Bytes,
    stream: Stream,
}

impl Rewind {
    pub fn new(unread: Bytes, stream: Stream) -> Rewind {
        Rewind { unread, stream }
    }

    /// The bytes put back that were not read yet, and the stream.
    pub fn into_parts(self) -> (Bytes, Stream) {
        (self.unread, self.stream)
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.unread.is_empty() {
            return Pin::new(&mut this.stream).poll_read(cx, buf);
        }
        let length = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread[..length]);
        this.unread.advance(length);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &[u8] =
        b"GET /ws?room=1 HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn an_upgrade_is_taken_only_when_its_head_is_whole() {
        for cut in [0, 1, 20, UPGRADE.len() - 1] {
            let mut buffer = BytesMut::from(&UPGRADE[..cut]);
            assert!(matches!(parse(&mut buffer, 100), Parsed::Partial), "{cut}");
            assert_eq!(&buffer[..], &UPGRADE[..cut]);
        }
        let mut buffer = BytesMut::from(UPGRADE);
        buffer.extend_from_slice(b"\x81\x02hi");
        let Parsed::Upgrade(request) = parse(&mut buffer, 100) else {
            panic!("not taken as an upgrade");
        };
        assert_eq!(&buffer[..], b"\x81\x02hi");
        assert_eq!(request.uri(), "/ws?room=1");
        assert_eq!(request.headers()["host"], "example.com");
        assert_eq!(request.headers()["sec-websocket-version"], "13");
    }

    #[test]
    fn everything_but_a_bodiless_http_1_1_get_upgrade_goes_to_hyper() {
        let text = std::str::from_utf8(UPGRADE).unwrap();
        let others = [
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
            text.replacen("GET", "POST", 1),
            text.replacen("HTTP/1.1", "HTTP/1.0", 1),
            text.replacen("\r\n\r\n", "\r\nContent-Length: 5\r\n\r\n", 1),
            text.replacen("\r\n\r\n", "\r\nTransfer-Encoding: chunked\r\n\r\n", 1),
            "GARBAGE\r\n\r\n".to_string(),
        ];
        for other in &others {
            // Hyper gets every byte back, the head included, whatever came after it.
            let mut buffer = BytesMut::from(format!("{other}tail").as_bytes());
            assert!(matches!(parse(&mut buffer, 100), Parsed::Other), "{other}");
            assert_eq!(&buffer[..], format!("{other}tail").as_bytes());
        }
        // More headers than allowed (hyper answers 431), on the stack's slots or the heap's.
        assert!(matches!(
            parse(&mut BytesMut::from(UPGRADE), 3),
            Parsed::Other
        ));
        let many: String = (0..150).map(|i| format!("X-{i}: v\r\n")).collect();
        let long = text.replacen("\r\n\r\n", &format!("\r\n{many}\r\n"), 1);
        assert!(matches!(
            parse(&mut BytesMut::from(long.as_bytes()), 120),
            Parsed::Other
        ));
        assert!(matches!(
            parse(&mut BytesMut::from(long.as_bytes()), 200),
            Parsed::Upgrade(_)
        ));
        // An upgrade hyper would take is answered here, its errors included (400 for no Host).
        let bare = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n";
        assert!(matches!(
            parse(&mut BytesMut::from(&bare[..]), 100),
            Parsed::Upgrade(_)
        ));
    }

    #[tokio::test]
    async fn rewind_gives_back_the_bytes_first_then_the_stream() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut peer = tokio::net::TcpStream::connect(address).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut peer, b" world")
            .await
            .unwrap();
        drop(peer);
        let mut rewind = Rewind::new(Bytes::from_static(b"hello"), Stream::Plain(accepted));
        let mut two = [0u8; 2];
        rewind.read_exact(&mut two).await.unwrap();
        assert_eq!(&two, b"he");
        let mut rest = Vec::new();
        rewind.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"llo world");
        let (unread, _) = rewind.into_parts();
        assert!(unread.is_empty());
    }
}
