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
    let (status, text) = raw_exchange(
        proxy.addresses[0],
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nx-test-status: 403\r\n\r\n",
    );
    assert_eq!(status, "HTTP/1.1 403 Nope");
    assert!(text.ends_with("nope\n"), "{text:?}");
    proxy.stop();
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
    for id in 0..10 {
        let report = run_client(proxy.addresses[0], &plan(id)).unwrap();
        assert!(report.head.starts_with("HTTP/1.1 101"), "{}", report.head);
        assert_eq!(report.received, Ok(1000));
    }
    assert_eq!(live.accepted.load(std::sync::atomic::Ordering::SeqCst), 10);
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
