//! Just enough WebSocket for a load generator and echo members: the opening handshake, and
//! binary frames with a zero mask key so the echoed bytes can be compared with what was sent.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Reads an HTTP head; returns it and the bytes read past it.
pub async fn read_head(stream: &mut (impl AsyncRead + Unpin)) -> io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::other("HTTP head too long"));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "EOF in HTTP head",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Names the member that answered an upgrade, so the balance scenario can see the split.
const MEMBER_HEADER: &str = "x-echo-member";

/// The client's opening handshake; returns bytes that came after the 101 and the port of the
/// member that answered.
pub async fn connect(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    host: &str,
) -> io::Result<(Vec<u8>, Option<u16>)> {
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let (head, rest) = read_head(stream).await?;
    let accept = derive_accept_key(KEY.as_bytes());
    if !head.starts_with("HTTP/1.1 101") || !head.contains(&accept) {
        return Err(io::Error::other(format!(
            "upgrade refused: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    let member = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case(MEMBER_HEADER)
            .then(|| value.trim().parse().ok())?
    });
    Ok((rest, member))
}

/// The server's side: answers the upgrade, naming itself by `port`; returns bytes that came
/// after the request.
pub async fn accept(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    port: u16,
) -> io::Result<Vec<u8>> {
    let (head, rest) = read_head(stream).await?;
    let key = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim().to_string())
        })
        .ok_or_else(|| io::Error::other("no Sec-WebSocket-Key"))?;
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n{MEMBER_HEADER}: {port}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    stream.write_all(response.as_bytes()).await?;
    Ok(rest)
}

/// A masked binary frame (mask key 0, so the payload is as given) carrying `payload_len`
/// bytes: a fixed pattern whose first eight bytes are replaced by `sequence`.
pub fn frame(payload_len: usize, sequence: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload_len + 14);
    out.push(0x82); // FIN, binary
    match payload_len {
        0..=125 => out.push(0x80 | payload_len as u8),
        126..=65535 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(payload_len as u16).to_be_bytes());
        }
        _ => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(payload_len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    let start = out.len();
    out.resize(start + payload_len, 0);
    for (index, byte) in out[start..].iter_mut().enumerate() {
        *byte = (index as u8).wrapping_mul(31);
    }
    let stamp = sequence.to_le_bytes();
    let take = payload_len.min(8);
    out[start..start + take].copy_from_slice(&stamp[..take]);
    out
}
