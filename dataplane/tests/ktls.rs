//! Kernel TLS from rustls's secrets: after a rustls handshake on each end of a TCP connection,
//! both sockets get kernel TLS for both directions, and plain reads and writes must carry every
//! byte, for each AEAD suite under TLS 1.3 and TLS 1.2. This host's kernel has no kernel TLS:
//! `cargo xtask test` runs these inside the VM (Debian's 6.1 kernel).

mod common;

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::thread;

use common::tls::{Ca, Scratch, accept_whole_record_handshake, client_with_early_request};
use common::{Pattern, read_pattern, write_pattern};
use rustls::crypto::ring::cipher_suite as suites;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ServerConfig, SupportedCipherSuite, SupportedProtocolVersion};

/// Drives a handshake to its end and flushes what it left to send.
fn finish_handshake(conn: &mut rustls::Connection, socket: &mut TcpStream) {
    while conn.is_handshaking() {
        conn.complete_io(socket).unwrap();
    }
    while conn.wants_write() {
        conn.write_tls(socket).unwrap();
    }
}

/// Moves a finished rustls connection's keys into kernel TLS on `socket`.
fn install(conn: rustls::Connection, socket: &TcpStream) {
    wsplice::sys::ktls_attach(socket.as_fd()).expect("attach the tls ULP");
    let version = conn.protocol_version().unwrap();
    #[allow(deprecated)] // these connections see no key update
    let secrets = match conn {
        rustls::Connection::Client(client) => client.dangerous_extract_secrets(),
        rustls::Connection::Server(server) => server.dangerous_extract_secrets(),
    }
    .unwrap();
    wsplice::tls::install_secrets(socket.as_fd(), version, secrets).expect("TLS_TX and TLS_RX");
    assert_eq!(wsplice::sys::tcp_ulp(socket.as_fd()).unwrap(), "tls");
}

/// Server and client configurations for one version and suite; the server sends `tickets`
/// TLS 1.3 session tickets after the handshake.
fn configs(
    version: &'static SupportedProtocolVersion,
    suite: SupportedCipherSuite,
    tickets: usize,
) -> (Arc<ServerConfig>, Arc<ClientConfig>, Scratch) {
    let scratch = Scratch::new();
    let ca = Ca::new("ktls CA");
    let (cert, key, _) = ca.issue(&scratch, "server", &["localhost"]);
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![suite];
    let provider = Arc::new(provider);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, PrivateKeyDer::from_pem_file(&key).unwrap())
        .unwrap();
    server.enable_secret_extraction = true;
    server.send_tls13_tickets = tickets;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.enable_secret_extraction = true;
    (Arc::new(server), Arc::new(client), scratch)
}

/// A TCP pair, each end with kernel TLS after a rustls handshake.
fn ktls_pair(
    version: &'static SupportedProtocolVersion,
    suite: SupportedCipherSuite,
) -> (TcpStream, TcpStream) {
    // No tickets: the client has no post-handshake records to read before its kernel takes over.
    let (server_config, client_config, _scratch) = configs(version, suite, 0);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        let mut conn =
            rustls::Connection::Server(rustls::ServerConnection::new(server_config).unwrap());
        finish_handshake(&mut conn, &mut socket);
        install(conn, &socket);
        socket
    });
    let mut socket = TcpStream::connect(address).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn =
        rustls::Connection::Client(rustls::ClientConnection::new(client_config, name).unwrap());
    finish_handshake(&mut conn, &mut socket);
    install(conn, &socket);
    (socket, server.join().unwrap())
}

#[test]
#[ignore = "needs kernel TLS: runs in the VM from `cargo xtask test`"]
fn kernel_tls_carries_every_byte_for_each_suite_and_version() {
    const BYTES: u64 = 8 << 20;
    let cases: [(&'static SupportedProtocolVersion, SupportedCipherSuite); 6] = [
        (&rustls::version::TLS13, suites::TLS13_AES_128_GCM_SHA256),
        (&rustls::version::TLS13, suites::TLS13_AES_256_GCM_SHA384),
        (
            &rustls::version::TLS13,
            suites::TLS13_CHACHA20_POLY1305_SHA256,
        ),
        (
            &rustls::version::TLS12,
            suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
        (
            &rustls::version::TLS12,
            suites::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ),
        (
            &rustls::version::TLS12,
            suites::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
    ];
    for (version, suite) in cases {
        let (client, server) = ktls_pair(version, suite);
        // Both directions at once, each checked byte by byte, then a half-close each way.
        let mut directions = Vec::new();
        for (seed, mut from, mut to) in [
            (
                1u64,
                client.try_clone().unwrap(),
                server.try_clone().unwrap(),
            ),
            (
                2u64,
                server.try_clone().unwrap(),
                client.try_clone().unwrap(),
            ),
        ] {
            directions.push(thread::spawn(move || {
                let writer = thread::spawn(move || {
                    write_pattern(&mut from, Pattern(seed), 0, BYTES).unwrap();
                    from.shutdown(std::net::Shutdown::Write).unwrap();
                });
                let read = read_pattern(&mut to, Pattern(seed), 0);
                writer.join().unwrap();
                read
            }));
        }
        for direction in directions {
            assert_eq!(
                direction.join().unwrap(),
                Ok(BYTES),
                "{:?} {:?}",
                version.version,
                suite.suite()
            );
        }
        eprintln!(
            "kernel TLS: {:?} {:?}: {BYTES} bytes each way",
            version.version,
            suite.suite()
        );
        drop((client, server));
    }
}

#[test]
#[ignore = "needs kernel TLS: runs in the VM from `cargo xtask test`"]
fn kernel_tls_takes_over_a_server_after_a_whole_record_handshake() {
    let request = b"GET /ws HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let answer = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
    for (version, suite) in [
        (&rustls::version::TLS13, suites::TLS13_AES_128_GCM_SHA256),
        (
            &rustls::version::TLS12,
            suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
    ] {
        // Session tickets go out before the kernel takes over; a normal rustls client talks to
        // the kernel from then on.
        let (server_config, client_config, _scratch) = configs(version, suite, 2);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (connection, mut socket) = accept_whole_record_handshake(listener, server_config);
            wsplice::sys::ktls_attach(socket.as_fd()).expect("attach the tls ULP");
            wsplice::tls::server_into_kernel(connection, socket.as_fd()).expect("kernel TLS");
            let mut received = vec![0u8; request.len()];
            std::io::Read::read_exact(&mut socket, &mut received).unwrap();
            assert_eq!(&received, request, "the request, decrypted by the kernel");
            std::io::Write::write_all(&mut socket, answer).unwrap();
            // The client's close_notify comes as an alert record (a plain read would fail with
            // EIO), then its FIN.
            let mut record = [0u8; 64];
            let close = wsplice::sys::ktls_recv(socket.as_fd(), &mut record, 0).unwrap();
            assert_eq!(
                close,
                wsplice::sys::KtlsRecord::Control {
                    record_type: 21,
                    len: 2
                }
            );
            assert_eq!(&record[..2], [1, 0], "a warning-level close_notify");
            assert_eq!(
                wsplice::sys::ktls_recv(socket.as_fd(), &mut record, 0).unwrap(),
                wsplice::sys::KtlsRecord::Data(0)
            );
            socket
        });
        let mut client = client_with_early_request(address, client_config, request);
        let mut received = vec![0u8; answer.len()];
        std::io::Read::read_exact(&mut client, &mut received).unwrap();
        assert_eq!(&received, answer, "the answer, encrypted by the kernel");
        client.conn.send_close_notify();
        std::io::Write::flush(&mut client).unwrap();
        client.sock.shutdown(std::net::Shutdown::Write).unwrap();
        drop(server.join().unwrap());
        eprintln!("kernel TLS took over a {:?} server", version.version);
    }
}
