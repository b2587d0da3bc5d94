//! The HTTP stage against real sockets: what the client and the member see of a handshake, the
//! error answers, retries and limits. No root needed (userspace data plane).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use wsplice::config::{self, DataplaneMode};

fn plan(id: u64) -> ClientPlan {
    ClientPlan::simple(id, 1000, 1000)
}

#[test]
fn the_member_sees_host_kept_and_forwarded_headers_and_the_client_sees_the_101_untouched() {
    let members = start_members(1);
    let proxy = start_proxy(DataplaneMode::Userspace, &members, "byrequests", None);
    let report = run_client(proxy.addresses[0], &plan(1)).unwrap();
    assert!(report.head.starts_with("HTTP/1.1 101"), "{}", report.head);
    assert_eq!(
        header(&report.head, "sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    assert_eq!(header(&report.head, "sec-websocket-protocol"), Some("chat"));
    assert_eq!(header(&report.head, "upgrade"), Some("websocket"));
    assert_eq!(report.received, Ok(1000));

    let seen = wait_for_report(&members, 1, Duration::from_secs(5)).expect("the member reported");
    assert_eq!(seen.received, Ok(1000));
    let head = &seen.request_head;
    assert!(head.starts_with("GET /ws HTTP/1.1"), "{head}");
    assert_eq!(header(head, "host"), Some("test.local"));
    assert_eq!(header(head, "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(header(head, "x-forwarded-proto"), Some("http"));
    assert_eq!(header(head, "x-forwarded-host"), Some("test.local"));
    assert_eq!(
        header(head, "sec-websocket-key"),
        Some("dGhlIHNhbXBsZSBub25jZQ==")
    );
    assert_eq!(header(head, "sec-websocket-protocol"), Some("chat"));
    proxy.stop();
}

#[test]
fn bad_upgrades_get_400_with_a_reason() {
    let members = start_members(1);
    let proxy = start_proxy(DataplaneMode::Userspace, &members, "byrequests", None);
    let address = proxy.addresses[0];
    let base = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n";
    let (status, text) = raw_exchange(
        address,
        format!("{base}Sec-WebSocket-Version: 13\r\n\r\n").as_bytes(),
    );
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    assert!(
        text.contains("Sec-WebSocket-Key header is missing"),
        "{text}"
    );

    let (status, text) = raw_exchange(
        address,
        format!(
            "{base}Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    assert!(text.contains("Sec-WebSocket-Version must be 13"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{text}"
    );

    let (status, text) = raw_exchange(
        address,
        b"POST /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    assert!(text.contains("GET"), "{text}");

    let (status, _) = raw_exchange(address, b"GARBAGE\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    assert_eq!(
        members[0]
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    proxy.stop();
}

#[test]
fn oversized_headers_get_431() {
    let members = start_members(1);
    let proxy = start_proxy(DataplaneMode::Userspace, &members, "byrequests", None);
    let big = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    let (status, _) = raw_exchange(proxy.addresses[0], big.as_bytes());
    assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let (status, _) = raw_exchange(
        proxy.addresses[0],
        format!("GET /ws HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
    );
    assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");
    proxy.stop();
}

#[test]
fn no_route_gets_404() {
    let members = start_members(1);
    let text = format!(
        "[server]\ndataplane = \"userspace\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
         [[route]]\npath = \"/ws\"\ncluster = \"c\"\n[[cluster]]\nname = \"c\"\n\
         [[cluster.member]]\nurl = \"ws://{}\"\n",
        members[0].address
    );
    let proxy = wsplice::server::start(config::parse("t.toml", &text).unwrap()).unwrap();
    let (status, _) = raw_exchange(
        proxy.addresses[0],
        b"GET /other HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let report = run_client(proxy.addresses[0], &plan(2)).unwrap();
    assert_eq!(report.received, Ok(1000));
    proxy.stop();
}

#[test]
fn a_non_101_answer_reaches_the_client_as_it_is() {
    let members = start_members(1);
    let proxy = start_proxy(DataplaneMode::Userspace, &members, "byrequests", None);
    let (status, text) = raw_exchange(proxy.addresses[0], refused_upgrade(403).as_bytes());
    assert_eq!(status, "HTTP/1.1 403 Nope");
    assert!(text.ends_with("nope\n"), "{text:?}");
    proxy.stop();
}

/// A member that answers its n-th connection's request head with `answers[n]`, then closes.
fn scripted_member(answers: Vec<Vec<u8>>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for answer in answers {
            let Ok((mut stream, _)) = listener.accept() else {
                return;
            };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read_exact(&mut byte).is_ok() {
                head.push(byte[0]);
            }
            let _ = stream.write_all(&answer);
        }
    });
    address
}

/// An upgrade the test member answers with `status` (and the body "nope\n").
fn refused_upgrade(status: u16) -> String {
    String::from_utf8_lossy(UPGRADE)
        .replace("\r\n\r\n", &format!("\r\nx-test-status: {status}\r\n\r\n"))
}

const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

#[test]
fn a_non_101_answer_in_any_framing_reaches_the_client_whole() {
    let too_big = 2 << 20;
    let member = scripted_member(vec![
        // An informational answer first, then a chunked body with a trailer.
        b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 403 Nope\r\ntransfer-encoding: chunked\r\n\r\n2\r\nno\r\n3;x=y\r\npe\n\r\n0\r\nx-trailer: 1\r\n\r\n".to_vec(),
        // A body that runs to the close.
        b"HTTP/1.1 500 Internal Server Error\r\nx-why: test\r\n\r\noops".to_vec(),
        // More than is held: 502, and the member stays in use.
        format!("HTTP/1.1 404 Not Found\r\ncontent-length: {too_big}\r\n\r\n").into_bytes(),
        b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 3\r\n\r\nwho".to_vec(),
    ]);
    let proxy = wsplice::server::start(userspace_config(vec![format!("ws://{member}")])).unwrap();
    let address = proxy.addresses[0];

    let (status, text) = raw_exchange(address, UPGRADE);
    assert_eq!(status, "HTTP/1.1 403 Nope", "{text}");
    assert!(text.ends_with("\r\n\r\nnope\n"), "{text:?}");
    let head = text.split("\r\n\r\n").next().unwrap();
    assert_eq!(header(head, "content-length"), Some("5"), "{head}");
    assert_eq!(header(head, "transfer-encoding"), None, "{head}");
    assert_eq!(header(head, "link"), None, "{head}");

    let (status, text) = raw_exchange(address, UPGRADE);
    assert_eq!(status, "HTTP/1.1 500 Internal Server Error", "{text}");
    assert_eq!(header(&text, "x-why"), Some("test"), "{text}");
    assert!(text.ends_with("\r\n\r\noops"), "{text:?}");

    let (status, text) = raw_exchange(address, UPGRADE);
    assert_eq!(status, "HTTP/1.1 502 Bad Gateway", "{text}");
    let (status, text) = raw_exchange(address, UPGRADE);
    assert_eq!(status, "HTTP/1.1 401 Unauthorized", "{text}");
    assert!(text.ends_with("\r\n\r\nwho"), "{text:?}");
    proxy.stop();
}

#[test]
fn a_malformed_or_missing_answer_sends_the_request_to_the_next_member() {
    let broken = scripted_member(vec![b"HTTP/1.1 10x Broken\r\n\r\n".to_vec()]);
    let silent = scripted_member(vec![Vec::new()]);
    let live = start_member(1);
    let config = userspace_config(vec![
        format!("ws://{broken}"),
        format!("ws://{silent}"),
        format!("ws://{}", live.address),
    ]);
    let proxy = wsplice::server::start(config).unwrap();
    every_upgrade_reaches(proxy.addresses[0], &live, 3);
    // Both scripted members were asked (each closes its listener after its one answer).
    for address in [broken, silent] {
        let refused = || TcpStream::connect(address).is_err();
        assert!(wait_until(Duration::from_secs(5), refused));
    }
    proxy.stop();
}

/// `count` upgrades in a row each get their 101 and echo; `live` took every one of them.
fn every_upgrade_reaches(proxy: std::net::SocketAddr, live: &Member, count: u64) {
    for id in 0..count {
        let report = run_client(proxy, &plan(id)).unwrap();
        assert!(report.head.starts_with("HTTP/1.1 101"), "{}", report.head);
        assert_eq!(report.received, Ok(1000));
    }
    assert_eq!(
        live.accepted.load(std::sync::atomic::Ordering::SeqCst),
        count
    );
}

/// An address nothing listens on.
fn dead_address() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[test]
fn an_unreachable_member_is_skipped_and_502_comes_only_when_none_can_serve() {
    let live = start_member(1);
    let dead = dead_address();
    let config = userspace_config(vec![
        format!("ws://{dead}"),
        format!("ws://{}", live.address),
    ]);
    let proxy = wsplice::server::start(config).unwrap();
    every_upgrade_reaches(proxy.addresses[0], &live, 10);
    proxy.stop();

    let config = userspace_config(vec![
        format!("ws://{}", dead_address()),
        format!("ws://{}", dead_address()),
    ]);
    let proxy = wsplice::server::start(config).unwrap();
    let (status, _) = raw_exchange(
        proxy.addresses[0],
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_eq!(status, "HTTP/1.1 502 Bad Gateway");
    proxy.stop();
}

#[test]
fn a_stalled_request_is_cut_at_the_handshake_timeout() {
    let members = start_members(1);
    let mut config = userspace_config(vec![format!("ws://{}", members[0].address)]);
    config.server.handshake_timeout = Duration::from_millis(500);
    let proxy = wsplice::server::start(config).unwrap();
    let mut stream = TcpStream::connect(proxy.addresses[0]).unwrap();
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "closed only after {waited:?}"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    proxy.stop();
}

#[test]
fn bytes_sent_with_the_request_and_with_the_101_arrive_once_in_order() {
    let members = start_members(1);
    let proxy = start_proxy(DataplaneMode::Userspace, &members, "byrequests", None);
    let mut plan = ClientPlan::simple(7, 300_000, 300_000);
    plan.up_with_request = 5_000;
    plan.down_early = 3_000;
    let report = run_client(proxy.addresses[0], &plan).unwrap();
    assert_eq!(report.received, Ok(300_000));
    let seen = wait_for_report(&members, 7, Duration::from_secs(5)).expect("the member reported");
    assert_eq!(seen.received, Ok(300_000));
    proxy.stop();
}

/// A refused upgrade is answered with the connection kept, and what follows on it is served:
/// here a second upgrade, sent before the first answer was read, whose tunnel then carries
/// checked bytes both ways (hyper serves the requests after the first).
#[test]
fn a_refused_upgrade_keeps_the_connection_for_the_next_request() {
    let members = start_members(1);
    let proxy = start_proxy(DataplaneMode::Userspace, &members, "byrequests", None);
    let refused = refused_upgrade(403);
    let dial: Dial = std::sync::Arc::new(move |proxy| {
        let mut stream = TcpStream::connect(proxy)?;
        stream.write_all(refused.as_bytes())?;
        let mut answer = [0u8; 256];
        let mut read = 0;
        while !answer[..read].ends_with(b"nope\n") {
            match stream.read(&mut answer[read..])? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => read += n,
            }
        }
        let text = String::from_utf8_lossy(&answer[..read]);
        assert!(text.starts_with("HTTP/1.1 403 Nope\r\n"), "{text}");
        assert_eq!(header(&text, "connection"), None, "{text}");
        Ok(Connection {
            reader: Box::new(stream.try_clone()?),
            writer: Box::new(stream),
        })
    });
    let mut plan = ClientPlan::simple(3, 200_000, 200_000);
    plan.up_with_request = 2_000;
    plan.down_early = 1_000;
    let report = run_client_over(&dial, proxy.addresses[0], &plan).unwrap();
    assert!(report.head.starts_with("HTTP/1.1 101"), "{}", report.head);
    assert_eq!(report.received, Ok(200_000));
    let seen = wait_for_report(&members, 3, Duration::from_secs(5)).expect("the member reported");
    assert_eq!(seen.received, Ok(200_000));

    // Pipelined: both requests in one write, both answered in order.
    let mut stream = TcpStream::connect(proxy.addresses[0]).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let first = refused_upgrade(404);
    stream
        .write_all(&[first.as_bytes(), UPGRADE].concat())
        .unwrap();
    let mut answers = Vec::new();
    let mut chunk = [0u8; 4096];
    while answers.windows(4).filter(|w| w == b"\r\n\r\n").count() < 2 {
        let n = stream.read(&mut chunk).unwrap();
        assert!(
            n > 0,
            "closed after {:?}",
            String::from_utf8_lossy(&answers)
        );
        answers.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&answers);
    assert!(text.starts_with("HTTP/1.1 404 Nope\r\n"), "{text}");
    assert!(
        text.contains("nope\nHTTP/1.1 101 Switching Protocols\r\n"),
        "{text}"
    );
    proxy.stop();
}

/// `Connection: close` on a refused upgrade: the answer says so and the connection closes.
#[test]
fn a_refused_upgrade_asking_to_close_is_closed() {
    let members = start_members(1);
    let proxy = start_proxy(DataplaneMode::Userspace, &members, "byrequests", None);
    let request = refused_upgrade(403).replace("Connection: Upgrade", "Connection: Upgrade, close");
    let mut stream = TcpStream::connect(proxy.addresses[0]).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 403 Nope\r\n"), "{text}");
    assert_eq!(header(&text, "connection"), Some("close"), "{text}");
    assert!(text.ends_with("\r\n\r\nnope\n"), "{text:?}");
    proxy.stop();
}

/// A request that arrives a byte at a time is still read whole and upgraded.
#[test]
fn an_upgrade_sent_a_byte_at_a_time_is_taken() {
    let members = start_members(1);
    let proxy = start_proxy(DataplaneMode::Userspace, &members, "byrequests", None);
    let dial: Dial = std::sync::Arc::new(|proxy| {
        let stream = TcpStream::connect(proxy)?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            reader: Box::new(stream.try_clone()?),
            writer: Box::new(ByteAtATime(stream)),
        })
    });
    let report = run_client_over(&dial, proxy.addresses[0], &plan(4)).unwrap();
    assert!(report.head.starts_with("HTTP/1.1 101"), "{}", report.head);
    assert_eq!(report.received, Ok(1000));
    proxy.stop();
}

/// Writes one byte per write(2).
struct ByteAtATime(TcpStream);

impl Write for ByteAtATime {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match buf.first() {
            Some(byte) => self.0.write(std::slice::from_ref(byte)),
            None => Ok(0),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl WriteHalf for ByteAtATime {
    fn shutdown_write(&mut self) -> std::io::Result<()> {
        self.0.shutdown(std::net::Shutdown::Write)
    }
}
