//! wss:// on the host: TLS listeners (rustls) in front of ws:// and wss:// members, carried by
//! the userspace relay (this kernel has no kernel TLS). The quick tests run with `cargo test`;
//! the heavy integrity tests (ignored) run single-threaded in release from `cargo xtask test`.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::tls::*;
use common::*;
use wsplice::config::{self, Config, QuickForm, UnknownSni};
use wsplice::server::ServerHandle;

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Log lines go to LOGS (asserted on) and to the test's stderr.
struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        std::io::stderr().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logged(needle: &str) -> bool {
    String::from_utf8_lossy(&LOGS.lock().unwrap()).contains(needle)
}

fn wait_for_log(needle: &str) -> bool {
    wait_until(Duration::from_secs(10), || logged(needle))
}

/// A wsplice whose listener serves wss:// with `cert`/`key` in front of `members` (urls).
fn tls_proxy(
    members: Vec<String>,
    cert: &Path,
    key: &Path,
    edit: impl FnOnce(&mut Config),
) -> ServerHandle {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(|| Capture)
        .with_ansi(false)
        .try_init();
    let mut config = config::quick(&QuickForm {
        listen: "127.0.0.1:0".into(),
        members,
        tls_cert: Some(cert.display().to_string()),
        tls_key: Some(key.display().to_string()),
        ..Default::default()
    })
    .unwrap();
    config.server.workers = 2;
    // Kernel TLS where the kernel has it (in the VM), rustls otherwise (this host).
    config.server.kernel_tls = true;
    edit(&mut config);
    wsplice::server::start(config).unwrap()
}

fn ws_urls(members: &[Member]) -> Vec<String> {
    members
        .iter()
        .map(|m| format!("ws://{}", m.address))
        .collect()
}

/// One CA, one certificate for localhost, and a client trusting the CA.
struct Pki {
    scratch: Scratch,
    ca: Ca,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

fn pki() -> Pki {
    let scratch = Scratch::new();
    let ca = Ca::new("wsplice test CA");
    let (cert, key, _) = ca.issue(&scratch, "localhost", &["localhost"]);
    Pki {
        scratch,
        ca,
        cert,
        key,
    }
}

#[test]
fn wss_clients_reach_ws_members_with_every_byte() {
    let (_pki, members, proxy, dial) = wss_setup(3);
    let mut rng = Rng(0x7157);
    let plans: Vec<ClientPlan> = (0..32)
        .map(|id| {
            let mut plan = ClientPlan::simple(id, rng.below(1 << 20), rng.below(1 << 20));
            plan.up_with_request = rng.below(8192);
            plan.down_early = rng.below(8192);
            plan.up_before_101 = rng.below(2) == 0;
            plan
        })
        .collect();
    // Bytes sent with the request, before the 101 or with it may cross with the handshake.
    let carried: u64 = plans
        .iter()
        .map(|p| {
            let up = if p.up_before_101 {
                0
            } else {
                p.up_len - p.up_with_request.min(p.up_len)
            };
            up + p.down_len - p.down_early.min(p.down_len)
        })
        .sum();
    run_and_check_over(&dial, &proxy, &members, plans, 8);
    assert_carried(&proxy, carried);
    let report = wait_for_report(&members, 0, Duration::from_secs(1)).unwrap();
    assert_eq!(
        header(&report.request_head, "x-forwarded-proto"),
        Some("https"),
        "{}",
        report.request_head
    );
    proxy.stop();
}

/// Set by `cargo xtask test` in the VM, whose kernel has kernel TLS: the suite then fails
/// instead of passing on the rustls relay.
fn kernel_tls_expected() -> bool {
    std::env::var_os("WSPLICE_EXPECT_KERNEL_TLS").is_some()
}

/// The payload (`payload` bytes) went through the carrier this kernel calls for: with kernel
/// TLS, splice with no byte read into userspace; without, the rustls relay. Bytes that came
/// with a handshake are forwarded before either takes the pair.
fn assert_carried(proxy: &ServerHandle, payload: u64) {
    let dataplane = &proxy.shared.dataplane;
    let relayed = dataplane.relay_stats.relayed_bytes.load(Ordering::Relaxed);
    let at_least = payload
        - dataplane
            .handover_bytes
            .load(Ordering::Relaxed)
            .min(payload);
    assert!(
        dataplane.splice().is_some() || !kernel_tls_expected(),
        "kernel TLS was expected here, but: {}",
        dataplane.tls_announcement
    );
    match dataplane.splice() {
        Some(splice) => {
            assert!(
                wait_until(Duration::from_secs(10), || splice
                    .stats
                    .open_pairs
                    .load(Ordering::Relaxed)
                    == 0),
                "spliced pairs still open"
            );
            let spliced = splice.stats.spliced_bytes.load(Ordering::Relaxed);
            eprintln!(
                "splice carrier: {spliced} bytes in {} splices over {} pairs; relay read {relayed}",
                splice.stats.splices.load(Ordering::Relaxed),
                splice.stats.pairs.load(Ordering::Relaxed)
            );
            assert_eq!(
                relayed, 0,
                "payload was read into userspace under kernel TLS"
            );
            assert!(spliced >= at_least, "spliced {spliced} of {at_least} bytes");
        }
        None => assert!(relayed >= at_least, "relayed {relayed} of {at_least} bytes"),
    }
}

#[test]
fn every_suite_and_version_carries_every_byte() {
    use rustls::crypto::ring::cipher_suite as suites;
    let pki = pki();
    let members = start_members(2);
    let proxy = tls_proxy(ws_urls(&members), &pki.cert, &pki.key, |_| {});
    let tls13 = [
        suites::TLS13_AES_128_GCM_SHA256,
        suites::TLS13_AES_256_GCM_SHA384,
        suites::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    let tls12 = [
        suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        suites::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        suites::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    let combinations = tls13
        .into_iter()
        .map(|suite| (&rustls::version::TLS13, suite))
        .chain(
            tls12
                .into_iter()
                .map(|suite| (&rustls::version::TLS12, suite)),
        );
    let mut carried = 0;
    for (round, (version, suite)) in combinations.enumerate() {
        let config = client_config_offering(&[&pki.ca], &[version], Some(suite));
        let dial = tls_dial(config, "localhost");
        let plans: Vec<ClientPlan> = (0..4)
            .map(|i| {
                let mut plan = ClientPlan::simple(round as u64 * 10 + i, 300_000, 200_000 + i);
                plan.half_close = i % 2 == 0;
                plan
            })
            .collect();
        carried += plans.iter().map(|p| p.up_len + p.down_len).sum::<u64>();
        eprintln!("{suite:?}");
        run_and_check_over(&dial, &proxy, &members, plans, 4);
    }
    assert_carried(&proxy, carried);
    proxy.stop();
}

/// Whether this kernel's TLS takes a new receive key (TLS 1.3 rekeying came in Linux 6.14).
fn kernel_tls_follows_key_updates() -> bool {
    wsplice::offload::kernel_release() >= (6, 14)
}

/// A TLS 1.3 client that updates its keys mid-stream and asks wsplice to update its own; the
/// member answers after the client's end, so the answer travels under wsplice's new key. The
/// rustls relay (this host) and kernel TLS on a kernel that takes new keys (6.14+, the second
/// VM) carry every byte both ways; kernel TLS on an older kernel (6.1, the first VM) passes on
/// every byte before the update, then ends the pair with a log line: no byte it could not
/// decrypt goes anywhere.
#[test]
fn a_client_key_update_mid_stream() {
    const HALF: u64 = 300_000;
    let pki = pki();
    let members = start_members(1);
    let proxy = tls_proxy(ws_urls(&members), &pki.cert, &pki.key, |_| {});
    let config = client_config_offering(&[&pki.ca], &[&rustls::version::TLS13], None);
    let mut plan = ClientPlan::simple(77, 2 * HALF, HALF);
    plan.down_after_eof = true;
    let request = upgrade_request(&plan);
    let mut stream = client_with_early_request(proxy.addresses[0], config, request.as_bytes());
    let (head, early) = read_head(&mut stream).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        early.is_empty(),
        "the member sends nothing before the client's end"
    );
    let pattern = Pattern(plan.up_seed);
    write_pattern(&mut stream, pattern, 0, HALF).unwrap();
    stream.conn.refresh_traffic_keys().unwrap();
    // Under kernel TLS that cannot follow, the proxy may be gone before these are written.
    let _ = write_pattern(&mut stream, pattern, HALF, HALF);
    stream.conn.send_close_notify();
    let _ = stream.flush();
    let _ = stream.sock.shutdown(std::net::Shutdown::Write);
    let report = wait_for_report(&members, plan.id, Duration::from_secs(20)).unwrap();
    let spliced = proxy.shared.dataplane.splice().is_some();
    if spliced && !kernel_tls_follows_key_updates() {
        assert_eq!(report.received, Ok(HALF));
        assert!(wait_for_log("key update"), "no log line for the key update");
    } else {
        assert_eq!(report.received, Ok(2 * HALF));
        let down = read_pattern(&mut stream, Pattern(plan.down_seed), 0);
        assert_eq!(down, Ok(HALF), "the member's answer, after the key updates");
        assert_carried(&proxy, 3 * HALF);
        if let Some(splice) = proxy.shared.dataplane.splice() {
            let followed = splice.stats.key_updates.load(Ordering::Relaxed);
            assert_eq!(followed, 1, "the splice carrier followed the key update");
        }
    }
    proxy.stop();
}

#[test]
fn sni_picks_the_certificate_and_unknown_names_follow_the_setting() {
    let scratch = Scratch::new();
    let ca = Ca::new("wsplice test CA");
    let (a_cert, a_key, a_der) = ca.issue(&scratch, "a", &["a.test"]);
    let (b_cert, b_key, b_der) = ca.issue(&scratch, "b", &["b.test", "*.b.test"]);
    let members = start_members(1);
    let client = client_config(&[&ca]);
    for unknown_sni in [UnknownSni::Default, UnknownSni::Reject] {
        let proxy = tls_proxy(ws_urls(&members), &a_cert, &a_key, |config| {
            let tls = config.listeners[0].tls.as_mut().unwrap();
            tls.certificates.push(wsplice::config::CertificateFiles {
                cert: b_cert.clone(),
                key: b_key.clone(),
            });
            tls.unknown_sni = unknown_sni;
        });
        let address = proxy.addresses[0];
        assert_eq!(connect_tls(address, &client, "a.test").unwrap().leaf, a_der);
        assert_eq!(connect_tls(address, &client, "b.test").unwrap().leaf, b_der);
        assert_eq!(
            connect_tls(address, &client, "chat.b.test").unwrap().leaf,
            b_der,
            "a wildcard name"
        );
        let unknown = connect_tls(address, &client, "c.test")
            .err()
            .expect("no certificate is valid for c.test")
            .to_string();
        match unknown_sni {
            // The default certificate came, and the client found it is not for c.test.
            UnknownSni::Default => assert!(
                unknown.contains("not valid for name \"c.test\"") && unknown.contains("a.test"),
                "{unknown}"
            ),
            UnknownSni::Reject => {
                assert!(unknown.contains("alert"), "{unknown}");
                assert!(wait_for_log("no certificate for SNI \"c.test\""));
            }
        }
        proxy.stop();
    }
}

/// A ClientHello offering only `version` (0x0301 TLS 1.0, 0x0302 TLS 1.1).
fn old_client_hello(version: u16) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version.to_be_bytes());
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0, 4, 0x00, 0x2f, 0x00, 0x35]); // AES-CBC-SHA suites
    body.extend_from_slice(&[1, 0]); // null compression
    let mut handshake = vec![1, 0, 0, body.len() as u8];
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01, 0, handshake.len() as u8];
    record.extend_from_slice(&handshake);
    record
}

#[test]
fn tls_1_0_and_1_1_clients_are_refused() {
    let pki = pki();
    let members = start_members(1);
    let proxy = tls_proxy(ws_urls(&members), &pki.cert, &pki.key, |_| {});
    for version in [0x0301u16, 0x0302] {
        let mut stream = TcpStream::connect(proxy.addresses[0]).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(&old_client_hello(version)).unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        // One fatal alert record (rustls answers handshake_failure) and nothing else.
        assert_eq!(
            answer,
            [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 40],
            "{version:#06x}: not one fatal alert"
        );
    }
    assert!(wait_for_log("TLS handshake failed: peer is incompatible"));
    assert_eq!(members[0].accepted.load(Ordering::SeqCst), 0);
    proxy.stop();
}

/// A second wsplice serving wss:// with `cert` in front of a plain member (a wss:// member),
/// and a wss:// wsplice in front of it that trusts only `pki`'s CA. Returns (outer, inner,
/// the plain member).
fn wss_member_chain(
    pki: &Pki,
    cert: &Path,
    key: &Path,
) -> (ServerHandle, ServerHandle, Vec<Member>) {
    let members = start_members(1);
    let inner = tls_proxy(ws_urls(&members), cert, key, |_| {});
    let ca_file = pki.scratch.path("ca.pem");
    pki.ca.write_pem(&ca_file);
    let outer = tls_proxy(
        vec![format!("wss://localhost:{}", inner.addresses[0].port())],
        &pki.cert,
        &pki.key,
        |config| config.clusters[0].member_tls.ca_file = Some(ca_file.clone()),
    );
    (outer, inner, members)
}

#[test]
fn wss_members_carry_every_byte() {
    let pki = pki();
    let (outer, inner, members) = wss_member_chain(&pki, &pki.cert, &pki.key);
    let mut rng = Rng(0x55);
    let plans: Vec<ClientPlan> = (0..16)
        .map(|id| {
            let mut plan = ClientPlan::simple(id, rng.below(512 << 10), rng.below(512 << 10));
            plan.down_early = rng.below(4096);
            plan
        })
        .collect();
    let carried: u64 = plans.iter().map(|p| p.up_len + p.down_len).sum();
    let dial = tls_dial(client_config(&[&pki.ca]), "localhost");
    run_and_check_over(&dial, &outer, &members, plans, 4);
    // Both proxies carry the payload: the outer one wss:// <-> wss://, the inner wss:// <-> ws://.
    assert_carried(&outer, carried);
    assert_carried(&inner, carried);
    if let Some(splice) = outer.shared.dataplane.splice() {
        // Kernel TLS on the client leg and on the member leg of all 16 pairs.
        assert_eq!(splice.stats.kernel_tls_legs.load(Ordering::Relaxed), 32);
    }
    outer.stop();
    inner.stop();
}

#[test]
fn a_wss_member_with_an_untrusted_certificate_is_a_502() {
    let pki = pki();
    let stranger = Ca::new("some other CA");
    let (cert, key, _) = stranger.issue(&pki.scratch, "stranger", &["localhost"]);
    let (outer, inner, members) = wss_member_chain(&pki, &cert, &key);
    let dial = tls_dial(client_config(&[&pki.ca]), "localhost");
    let report =
        run_client_over(&dial, outer.addresses[0], &ClientPlan::simple(1, 10, 10)).unwrap();
    assert!(report.head.starts_with("HTTP/1.1 502"), "{}", report.head);
    assert!(wait_for_log("TLS: invalid peer certificate"));
    assert_eq!(members[0].accepted.load(Ordering::SeqCst), 0);
    outer.stop();
    inner.stop();
}

#[test]
fn a_plain_listener_can_redirect_to_https() {
    let members = start_members(1);
    let mut config = userspace_config(ws_urls(&members));
    config.listeners[0].redirect_to_https = true;
    let proxy = wsplice::server::start(config).unwrap();
    let (status, answer) = raw_exchange(
        proxy.addresses[0],
        b"GET /chat?room=1 HTTP/1.1\r\nHost: example.com:8080\r\n\r\n",
    );
    assert_eq!(status, "HTTP/1.1 301 Moved Permanently", "{answer}");
    assert_eq!(
        header(&answer, "location"),
        Some("https://example.com/chat?room=1")
    );
    assert_eq!(members[0].accepted.load(Ordering::SeqCst), 0);
    proxy.stop();
}

#[test]
fn certificates_reload_on_change_and_sighup_without_dropping_connections() {
    let scratch = Scratch::new();
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let (old_cert, old_key, old_der) = old_ca.issue(&scratch, "old", &["localhost"]);
    let (new_cert, new_key, new_der) = new_ca.issue(&scratch, "new", &["localhost"]);
    let (cert, key) = (scratch.path("live.pem"), scratch.path("live.key"));
    std::fs::copy(&old_cert, &cert).unwrap();
    std::fs::copy(&old_key, &key).unwrap();
    let members = start_members(1);
    let proxy = tls_proxy(ws_urls(&members), &cert, &key, |_| {});
    let address = proxy.addresses[0];
    let client = client_config(&[&old_ca, &new_ca]);
    let presented = || connect_tls(address, &client, "localhost").unwrap().leaf;
    assert_eq!(presented(), old_der);

    // Load all along: short connections, each checked both ways.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let dial = tls_dial(Arc::clone(&client), "localhost");
    let loaders: Vec<_> = (0..4u64)
        .map(|worker| {
            let (stop, done, failed, dial) = (
                Arc::clone(&stop),
                Arc::clone(&done),
                Arc::clone(&failed),
                Arc::clone(&dial),
            );
            thread::spawn(move || {
                let mut id = 1_000_000 * (worker + 1);
                while !stop.load(Ordering::SeqCst) {
                    id += 1;
                    match run_client_over(&dial, address, &ClientPlan::simple(id, 20_000, 20_000)) {
                        Ok(report) if report.received == Ok(20_000) => {
                            done.fetch_add(1, Ordering::SeqCst);
                        }
                        other => failed.lock().unwrap().push(format!("{id}: {other:?}")),
                    }
                }
            })
        })
        .collect();

    // certbot's way: new files renamed over the live ones.
    let (staged_cert, staged_key) = (scratch.path("staged.pem"), scratch.path("staged.key"));
    std::fs::copy(&new_cert, &staged_cert).unwrap();
    std::fs::copy(&new_key, &staged_key).unwrap();
    std::fs::rename(&staged_key, &key).unwrap();
    std::fs::rename(&staged_cert, &cert).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || presented() == new_der),
        "the renewed certificate was not picked up"
    );

    // A broken file keeps the certificate in use, and says why.
    std::fs::write(&cert, "not a certificate\n").unwrap();
    assert!(wait_for_log("keeping the previous certificates"));
    assert_eq!(presented(), new_der);

    // SIGHUP reloads whatever the files hold now.
    std::fs::copy(&old_cert, &cert).unwrap();
    std::fs::copy(&old_key, &key).unwrap();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(wait_for_log("SIGHUP: reloading"));
    assert!(wait_until(Duration::from_secs(10), || presented() == old_der));

    stop.store(true, Ordering::SeqCst);
    for loader in loaders {
        loader.join().unwrap();
    }
    let failed = failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(done.load(Ordering::SeqCst) > 10, "too little load ran");
    proxy.stop();
}

/// A wss:// wsplice in front of `count` members, and a client trusting its certificate.
fn wss_setup(count: usize) -> (Pki, Vec<Member>, ServerHandle, Dial) {
    let pki = pki();
    let members = start_members(count);
    let proxy = tls_proxy(ws_urls(&members), &pki.cert, &pki.key, |_| {});
    let dial = tls_dial(client_config(&[&pki.ca]), "localhost");
    (pki, members, proxy, dial)
}

#[test]
#[ignore = "heavy: run with `cargo xtask test`"]
fn wss_one_gib_each_way_through_one_connection() {
    const GIB: u64 = 1 << 30;
    let (_pki, members, proxy, dial) = wss_setup(1);
    let started = Instant::now();
    run_and_check_over(
        &dial,
        &proxy,
        &members,
        vec![ClientPlan::simple(1, GIB, GIB)],
        1,
    );
    eprintln!("wss: 1 GiB each way in {:?}", started.elapsed());
    assert_carried(&proxy, 2 * GIB);
    proxy.stop();
}

#[test]
#[ignore = "heavy: run with `cargo xtask test`"]
fn wss_ten_thousand_close_and_half_close_races() {
    let (_pki, members, proxy, dial) = wss_setup(3);
    let started = Instant::now();
    run_and_check_over(&dial, &proxy, &members, race_plans(0x7105, 10_000), 32);
    eprintln!("wss: 10,000 races in {:?}", started.elapsed());
    proxy.stop();
}

#[test]
#[ignore = "heavy: run with `cargo xtask test`"]
fn wss_slow_reader_holds_bounded_memory() {
    const BOUND: u64 = 4 << 20;
    let pki = pki();
    let members = start_members(1);
    let proxy = tls_proxy(ws_urls(&members), &pki.cert, &pki.key, |config| {
        config.server.max_buffered_per_direction = BOUND;
    });
    let client = connect_tls(proxy.addresses[0], &client_config(&[&pki.ca]), "localhost").unwrap();
    let Connection {
        mut reader,
        mut writer,
    } = client.connection;
    let mut plan = ClientPlan::simple(1, u64::MAX, 0);
    plan.slow_member = Some(Duration::from_secs(4));
    writer.write_all(upgrade_request(&plan).as_bytes()).unwrap();
    let (head, _) = read_head(&mut reader).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");

    // The client pushes for 3 s while the member reads 4 KiB every 10 ms; then it half-closes.
    let base_acked = wsplice::sys::tcp_info(std::os::fd::AsFd::as_fd(&client.socket))
        .unwrap()
        .bytes_acked;
    let pusher = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut buf = vec![0u8; 64 * 1024];
        let mut offset = 0u64;
        while Instant::now() < deadline {
            Pattern(plan.up_seed).fill(offset, &mut buf);
            writer.write_all(&buf).unwrap();
            offset += buf.len() as u64;
        }
        writer.shutdown_write().unwrap();
        offset
    });
    // The client's socket acks ciphertext, a little more than the payload.
    let peak = peak_held(
        &client.socket,
        base_acked,
        &members[0],
        Duration::from_secs(3),
    );
    let pushed = pusher.join().unwrap();
    eprintln!(
        "wss: client pushed {pushed} bytes; peak held by wsplice {peak} bytes (bound {BOUND})"
    );
    assert!(
        peak > 0,
        "nothing was measured as held: the measurement is broken"
    );
    assert!(
        peak < BOUND,
        "wsplice held {peak} bytes, over the {BOUND}-byte bound"
    );
    let report = wait_for_report(&members, 1, Duration::from_secs(30)).unwrap();
    assert_eq!(report.received, Ok(pushed));
    let _ = client.socket.shutdown(Shutdown::Both);
    assert_no_state_left(&proxy);
    proxy.stop();
}

#[test]
fn a_whole_record_handshake_leaves_the_request_in_the_kernel() {
    let pki = pki();
    let server = wsplice::tls::ServerTls::new(&wsplice::config::ListenerTls {
        certificates: vec![wsplice::config::CertificateFiles {
            cert: pki.cert.clone(),
            key: pki.key.clone(),
        }],
        unknown_sni: UnknownSni::Default,
    })
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let accepting = thread::spawn(move || accept_whole_record_handshake(listener, server.config));
    let _client = client_with_early_request(
        address,
        client_config(&[&pki.ca]),
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );
    let (connection, _socket) = accepting.join().unwrap();
    assert!(!connection.is_handshaking());
}
