//! The member's side of the HTTP stage: the upgrade request goes out in one write (sent by
//! `http::open_member` as soon as the connection allows) and the answer's head is parsed with
//! httparse. After a 101 the stream and the bytes that came with
//! the head go to the data plane; any other answer (an error page, as a rule) is read whole and
//! goes to the client. Written here rather than through hyper's client, which costs a task,
//! channels and a boxed upgrade per handshake.

use bytes::{Buf, Bytes, BytesMut};
use hyper::StatusCode;
use hyper::header::{self, HeaderMap};
use tokio::io::AsyncReadExt;

use crate::tls::Stream;

/// The largest body of a non-101 answer that is passed on (it is held whole).
pub const MAX_ANSWER_BODY: usize = 1 << 20;

/// A member's answer head.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    /// The reason phrase, when it is not the status's canonical one.
    pub reason: Option<hyper::ext::ReasonPhrase>,
    pub headers: HeaderMap,
    /// Bytes read after the head: after a 101, the tunnel's first bytes from the member.
    pub rest: BytesMut,
}

/// What the member's answer head may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_headers: usize,
    pub max_head_bytes: usize,
}

/// Reads the answer's head to the request the member was sent. An error means nothing usable
/// was answered, so the request may go to the next member.
pub async fn read_answer(stream: &mut Stream, limits: Limits) -> Result<Answer, String> {
    let mut buffer = BytesMut::with_capacity(4096);
    loop {
        if let Some(answer) = parse_head(&mut buffer, limits)? {
            // An informational answer (100, 103) is followed by the real one.
            if answer.status.is_informational() && answer.status != StatusCode::SWITCHING_PROTOCOLS
            {
                buffer = answer.rest;
                continue;
            }
            return Ok(answer);
        }
        if buffer.len() >= limits.max_head_bytes {
            return Err(format!(
                "the answer's head is over {} bytes",
                limits.max_head_bytes
            ));
        }
        fill(stream, &mut buffer)
            .await
            .map_err(|error| format!("reading the answer: {error}"))?;
    }
}

/// The answer head at the start of `buffer`, if it is all there; its bytes leave `buffer`.
fn parse_head(buffer: &mut BytesMut, limits: Limits) -> Result<Option<Answer>, String> {
    let mut on_stack = [httparse::EMPTY_HEADER; crate::head::STACK_SLOTS];
    let mut on_heap = Vec::new();
    let slots = crate::head::slots(&mut on_stack, &mut on_heap, limits.max_headers);
    let mut parsed = httparse::Response::new(slots);
    let length = match parsed.parse(buffer) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(format!("malformed answer: {error}")),
    };
    let code = parsed.code.unwrap_or_default();
    let status =
        StatusCode::from_u16(code).map_err(|_| format!("malformed answer: status {code}"))?;
    let reason = parsed
        .reason
        .filter(|reason| Some(*reason) != status.canonical_reason())
        .and_then(|reason| {
            hyper::ext::ReasonPhrase::try_from(Bytes::copy_from_slice(reason.as_bytes())).ok()
        });
    let fields = crate::head::fields(parsed.headers, buffer)
        .map_err(|error| format!("malformed answer: {error}"))?;
    let head = buffer.split_to(length).freeze();
    let headers = crate::head::header_map(&head, fields, 0)
        .map_err(|error| format!("malformed answer: {error}"))?;
    Ok(Some(Answer {
        status,
        reason,
        headers,
        rest: std::mem::take(buffer),
    }))
}

/// Reads more into `buffer`; the member closing first is an error.
async fn fill(stream: &mut Stream, buffer: &mut BytesMut) -> std::io::Result<()> {
    buffer.reserve(4096);
    match stream.read_buf(buffer).await? {
        0 => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the member closed the connection",
        )),
        _ => Ok(()),
    }
}

/// The body of a non-101 answer, framed as RFC 9112 section 6.3 says, at most
/// `MAX_ANSWER_BODY` bytes.
pub async fn read_body(stream: &mut Stream, answer: &mut Answer) -> Result<Bytes, String> {
    let status = answer.status;
    let buffer = &mut answer.rest;
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Bytes::new());
    }
    let last_coding = answer
        .headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .next_back();
    match last_coding {
        Some(coding) if coding.eq_ignore_ascii_case("chunked") => {
            read_chunked(stream, buffer).await
        }
        // Any other coding: the body runs to the close.
        Some(_) => read_to_close(stream, buffer).await,
        None => match answer.headers.get(header::CONTENT_LENGTH) {
            Some(value) => {
                let length = value
                    .to_str()
                    .ok()
                    .and_then(|text| text.trim().parse::<usize>().ok())
                    .ok_or("malformed Content-Length")?;
                if length > MAX_ANSWER_BODY {
                    return Err(format!("a body of {length} bytes"));
                }
                while buffer.len() < length {
                    fill(stream, buffer).await.map_err(|e| e.to_string())?;
                }
                Ok(buffer.split_to(length).freeze())
            }
            None => read_to_close(stream, buffer).await,
        },
    }
}

async fn read_to_close(stream: &mut Stream, buffer: &mut BytesMut) -> Result<Bytes, String> {
    loop {
        if buffer.len() > MAX_ANSWER_BODY {
            return Err(format!("a body over {MAX_ANSWER_BODY} bytes"));
        }
        buffer.reserve(4096);
        match stream.read_buf(buffer).await {
            Ok(0) => return Ok(std::mem::take(buffer).freeze()),
            Ok(_) => {}
            Err(error) => return Err(error.to_string()),
        }
    }
}

/// A chunked body, decoded (trailers are dropped).
async fn read_chunked(stream: &mut Stream, buffer: &mut BytesMut) -> Result<Bytes, String> {
    let mut body = BytesMut::new();
    loop {
        let (start, size) = loop {
            match httparse::parse_chunk_size(buffer) {
                Ok(httparse::Status::Complete(found)) => break found,
                Ok(httparse::Status::Partial) if buffer.len() < 1024 => {
                    fill(stream, buffer).await.map_err(|e| e.to_string())?;
                }
                _ => return Err("malformed chunk size".into()),
            }
        };
        buffer.advance(start);
        if size == 0 {
            // Trailer lines up to an empty one.
            loop {
                match buffer.windows(2).position(|pair| pair == b"\r\n") {
                    Some(0) => return Ok(body.freeze()),
                    Some(end) => buffer.advance(end + 2),
                    None if buffer.len() < 16 * 1024 => {
                        fill(stream, buffer).await.map_err(|e| e.to_string())?;
                    }
                    None => return Err("trailers too long".into()),
                }
            }
        }
        let size = usize::try_from(size)
            .ok()
            .filter(|size| body.len() + size <= MAX_ANSWER_BODY)
            .ok_or_else(|| format!("a body over {MAX_ANSWER_BODY} bytes"))?;
        while buffer.len() < size + 2 {
            fill(stream, buffer).await.map_err(|e| e.to_string())?;
        }
        if &buffer[size..size + 2] != b"\r\n" {
            return Err("a chunk without its CRLF".into());
        }
        body.extend_from_slice(&buffer[..size]);
        buffer.advance(size + 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_headers: 8,
        max_head_bytes: 8192,
    };

    #[test]
    fn a_head_is_parsed_only_when_whole_and_the_rest_is_kept() {
        let mut buffer = BytesMut::from(&b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: web"[..]);
        assert!(parse_head(&mut buffer, LIMITS).unwrap().is_none());
        buffer.extend_from_slice(b"socket\r\nX-Y: z\r\n\r\n\x81\x02hi");
        let answer = parse_head(&mut buffer, LIMITS).unwrap().unwrap();
        assert_eq!(answer.status, StatusCode::SWITCHING_PROTOCOLS);
        assert!(answer.reason.is_none());
        assert_eq!(answer.headers["upgrade"], "websocket");
        assert_eq!(answer.headers["x-y"], "z");
        assert_eq!(&answer.rest[..], b"\x81\x02hi");
    }

    #[test]
    fn an_unusual_reason_phrase_is_kept_and_bad_heads_are_named() {
        let mut buffer = BytesMut::from(&b"HTTP/1.1 403 Nope\r\n\r\n"[..]);
        let answer = parse_head(&mut buffer, LIMITS).unwrap().unwrap();
        assert_eq!(answer.reason.unwrap().as_bytes(), b"Nope");
        let mut buffer = BytesMut::from(&b"HTTP/1.1 4x3 Nope\r\n\r\n"[..]);
        assert!(
            parse_head(&mut buffer, LIMITS)
                .unwrap_err()
                .contains("malformed")
        );
        let many: String = (0..9).map(|i| format!("X-{i}: v\r\n")).collect();
        let mut buffer = BytesMut::from(format!("HTTP/1.1 200 OK\r\n{many}\r\n").as_bytes());
        assert!(parse_head(&mut buffer, LIMITS).is_err());
    }
}
