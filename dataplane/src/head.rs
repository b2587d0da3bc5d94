//! HTTP/1.1 heads both sides of the handshake share: parsed with httparse into the http
//! types with each header value a slice of the bytes read (no copy per header), and written
//! in one buffer for one write.

use std::ops::Range;

use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode};

/// httparse's header slots live on the stack up to this many; a larger `max_headers` takes
/// the heap.
pub const STACK_SLOTS: usize = 100;

/// `max_headers` slots for httparse, from `on_stack` when it has room.
pub fn slots<'a, 'b>(
    on_stack: &'a mut [httparse::Header<'b>; STACK_SLOTS],
    on_heap: &'a mut Vec<httparse::Header<'b>>,
    max_headers: usize,
) -> &'a mut [httparse::Header<'b>] {
    if max_headers <= STACK_SLOTS {
        &mut on_stack[..max_headers]
    } else {
        on_heap.resize(max_headers, httparse::EMPTY_HEADER);
        on_heap
    }
}

/// Each parsed header's name, and where its value lies in `buffer` (which httparse parsed).
pub fn fields(
    parsed: &[httparse::Header<'_>],
    buffer: &[u8],
) -> Result<Vec<(HeaderName, Range<usize>)>, String> {
    let start = buffer.as_ptr() as usize;
    let mut fields = Vec::with_capacity(parsed.len());
    for field in parsed {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| format!("header name {:?}", field.name))?;
        let offset = field.value.as_ptr() as usize - start;
        fields.push((name, offset..offset + field.value.len()));
    }
    Ok(fields)
}

/// The headers, each value a slice of `head` (the buffer `fields` looked at, frozen), with
/// room for `more` to be added.
pub fn header_map(
    head: &Bytes,
    fields: Vec<(HeaderName, Range<usize>)>,
    more: usize,
) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::with_capacity(fields.len() + more);
    for (name, range) in fields {
        let value = HeaderValue::from_maybe_shared(head.slice(range))
            .map_err(|_| format!("value of {name}"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// A request head for a member (origin-form path, HTTP/1.1).
pub fn request_head(method: &Method, path: &str, headers: &HeaderMap) -> Vec<u8> {
    head(
        &[
            method.as_str().as_bytes(),
            b" ",
            path.as_bytes(),
            b" HTTP/1.1\r\n",
        ],
        headers,
    )
}

/// A response head as hyper writes it (lowercase names, no Date), body not included.
pub fn response_head(status: StatusCode, reason: Option<&[u8]>, headers: &HeaderMap) -> Vec<u8> {
    let reason = reason.unwrap_or(status.canonical_reason().unwrap_or("").as_bytes());
    head(
        &[
            b"HTTP/1.1 ",
            status.as_str().as_bytes(),
            b" ",
            reason,
            b"\r\n",
        ],
        headers,
    )
}

/// The first line's parts, each header, then the empty line, in a buffer of the exact size.
fn head(first_line: &[&[u8]], headers: &HeaderMap) -> Vec<u8> {
    let size: usize = first_line.iter().map(|part| part.len()).sum::<usize>()
        + headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>()
        + 2;
    let mut head = Vec::with_capacity(size);
    for part in first_line {
        head.extend_from_slice(part);
    }
    for (name, value) in headers {
        for part in [name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r\n"] {
            head.extend_from_slice(part);
        }
    }
    head.extend_from_slice(b"\r\n");
    debug_assert_eq!(head.len(), size);
    head
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_head_carries_every_header_in_order() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("example.com"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        let head = request_head(&Method::GET, "/ws?x=1", &headers);
        assert_eq!(
            head,
            b"GET /ws?x=1 HTTP/1.1\r\nhost: example.com\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
        );
    }

    #[test]
    fn the_head_is_written_as_hyper_writes_it() {
        let mut headers = HeaderMap::new();
        headers.insert("upgrade", HeaderValue::from_static("websocket"));
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        assert_eq!(
            response_head(StatusCode::SWITCHING_PROTOCOLS, None, &headers),
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nset-cookie: a=1\r\n\
              set-cookie: b=2\r\n\r\n"
        );
        assert_eq!(
            response_head(StatusCode::FORBIDDEN, Some(b"Nope"), &HeaderMap::new()),
            b"HTTP/1.1 403 Nope\r\n\r\n"
        );
    }

    #[test]
    fn values_are_slices_of_the_head_and_bad_names_are_named() {
        let text = b"GET / HTTP/1.1\r\nHost: example.com\r\nX-A: 1\r\n\r\n";
        let mut on_stack = [httparse::EMPTY_HEADER; STACK_SLOTS];
        let mut on_heap = Vec::new();
        let mut parsed = httparse::Request::new(slots(&mut on_stack, &mut on_heap, 4));
        assert!(parsed.parse(text).unwrap().is_complete());
        let fields = fields(parsed.headers, text).unwrap();
        let head = Bytes::from_static(text);
        let headers = header_map(&head, fields, 0).unwrap();
        assert_eq!(headers["host"], "example.com");
        assert_eq!(headers["x-a"], "1");
        let value = headers["host"].as_bytes().as_ptr() as usize;
        assert_eq!(value - text.as_ptr() as usize, 22);
        let bad = [httparse::Header {
            name: "bad name",
            value: b"v",
        }];
        assert!(super::fields(&bad, b"v").unwrap_err().contains("bad name"));
    }
}
