//! wsplice benchmarks: starts echo members and each target (pinned to core 0; this process,
//! with the load and the members, runs on the other cores), runs the scenarios, and writes
//! bench/results/latest.{json,md} (latest-netns.* with --netns). Run through
//! `cargo xtask bench [--quick] [--netns]`.
#![forbid(unsafe_code)]

mod load;
mod ws;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

const PROXY_PORT: u16 = 19100;
const MEMBER_PORTS: [u16; 3] = [19101, 19102, 19103];

/// Where the proxy runs relative to the load.
#[derive(Debug, Clone, Copy)]
struct Topology {
    /// The proxy's listening address; the members' address.
    listen: std::net::Ipv4Addr,
    members: std::net::Ipv4Addr,
    /// The network namespace the proxy runs in, if any.
    netns: Option<&'static str>,
}

/// Everything on loopback: the receiving side's softirq runs on the sender's CPU, so a
/// kernel data plane's work lands on the load's core.
const LOOPBACK: Topology = Topology {
    listen: std::net::Ipv4Addr::new(127, 0, 0, 1),
    members: std::net::Ipv4Addr::new(127, 0, 0, 1),
    netns: None,
};

/// The proxy in its own network namespace behind a veth pair, as on an edge node whose NIC
/// queues are served by the proxy's cores: each side's receive processing runs in a threaded
/// NAPI pinned to that side's core (the proxy side's to core 0, the load side's to core 1).
/// Addresses exist only inside namespaces made here.
const NETNS: Topology = Topology {
    listen: std::net::Ipv4Addr::new(10, 77, 0, 2),
    members: std::net::Ipv4Addr::new(10, 77, 0, 1),
    netns: Some("wsplice-bench"),
};

fn sh(command: &str) -> Result<()> {
    let status = Command::new("sh").arg("-c").arg(command).status()?;
    if !status.success() {
        bail!("`{command}` failed: {status}");
    }
    Ok(())
}

const HOST_TW_REUSE: &str = "/proc/sys/net/ipv4/tcp_tw_reuse";
const REMOVE_NETNS: &str =
    "ip netns del wsplice-bench 2>/dev/null; ip link del wsb-host 2>/dev/null";

/// The proxy's namespace and the veth pair to it, removed (and the host's sysctl restored)
/// when dropped.
struct Netns {
    host_tw_reuse: String,
}

impl Netns {
    fn set_up() -> Result<Netns> {
        let _ = sh(REMOVE_NETNS);
        let host_tw_reuse = std::fs::read_to_string(HOST_TW_REUSE)?.trim().to_string();
        let netns = Netns { host_tw_reuse };
        sh("ip netns add wsplice-bench")?;
        sh("ip link add wsb-host type veth peer name wsb-proxy")?;
        sh("ip link set wsb-proxy netns wsplice-bench")?;
        sh("ip addr add 10.77.0.1/24 dev wsb-host && ip link set wsb-host up")?;
        // Each end: 64 KiB frames like loopback's; GRO on and TSO off, because veth takes its
        // NAPI path only then; NAPI in a kernel thread, so it can be pinned to a core.
        let end =
            "mtu 65535 && ethtool -K DEV gro on tso off && echo 1 > /sys/class/net/DEV/threaded";
        sh(&format!(
            "ip link set wsb-host {}",
            end.replace("DEV", "wsb-host")
        ))?;
        sh(&format!(
            "ip netns exec wsplice-bench sh -c 'ip link set lo up && ip addr add 10.77.0.2/24 dev wsb-proxy && \
             ip link set wsb-proxy up && ip link set wsb-proxy {}'",
            end.replace("DEV", "wsb-proxy")
        ))?;
        for (side, core_mask) in [("wsb-proxy", 1), ("wsb-host", 2)] {
            sh(&format!(
                "threads=$(pgrep '^napi/{side}') && \
                 for p in $threads; do taskset -p {core_mask} $p >/dev/null; done"
            ))
            .with_context(|| {
                format!("{side}'s NAPI threads did not start (threaded NAPI needs kernel 5.12+)")
            })?;
        }
        // Handshake runs open tens of thousands of connections; TIME_WAIT reuse, which the
        // host allows by default only on loopback, keeps ports free on both sides.
        sh("ip netns exec wsplice-bench sysctl -qw net.ipv4.tcp_tw_reuse=1")?;
        std::fs::write(HOST_TW_REUSE, "1")?;
        Ok(netns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::fs::write(HOST_TW_REUSE, &self.host_tw_reuse);
        let _ = sh(REMOVE_NETNS);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Direct,
    WspliceSockmap,
    WspliceUserspace,
    /// wss:// with kernel TLS + splice (only where the kernel has kernel TLS: the VM).
    WspliceKernelTls,
    /// ws:// pairs spliced through io_uring (`--dataplane splice`; the VM comparison).
    WspliceSplice,
    Haproxy,
    Nginx,
    Apache,
}

impl Target {
    const ALL: [Target; 7] = [
        Target::Direct,
        Target::WspliceSockmap,
        Target::WspliceSplice,
        Target::WspliceUserspace,
        Target::Haproxy,
        Target::Nginx,
        Target::Apache,
    ];

    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct (no proxy)",
            Target::WspliceSockmap => "wsplice sockmap",
            Target::WspliceUserspace => "wsplice userspace",
            Target::WspliceKernelTls => "wsplice kernel TLS",
            Target::WspliceSplice => "wsplice splice",
            Target::Haproxy => "HAProxy",
            Target::Nginx => "nginx",
            Target::Apache => "Apache httpd",
        }
    }
}

/// A proxy under test, in its own process group so its whole tree can be measured and stopped.
struct Running {
    child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        let pgid = self.child.id();
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{pgid}")]) // `--`: a negative pid names the group
            .status();
        std::thread::sleep(Duration::from_millis(300));
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .status();
        let _ = self.child.wait();
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `{{BALANCE}}` in each peer's config, per method.
fn balance_directive(name: &str, method: Method) -> &'static str {
    match (name, method) {
        ("haproxy.cfg", Method::RoundRobin) => "roundrobin",
        ("haproxy.cfg", Method::LeastConn) => "leastconn",
        ("nginx.conf", Method::RoundRobin) => "", // round robin is nginx's default
        ("nginx.conf", Method::LeastConn) => "least_conn;",
        (_, Method::RoundRobin) => "byrequests",
        (_, Method::LeastConn) => "bybusyness",
    }
}

/// wss://: one self-signed ECDSA P-256 certificate for every target, and a client that offers
/// only TLS 1.3 with AES-128-GCM and never resumes, so each target does the same full
/// handshake and the same cipher.
struct BenchTls {
    cert: PathBuf,
    key: PathBuf,
    /// Certificate and key in one file (HAProxy's `crt`).
    combined: PathBuf,
    connector: tokio_rustls::TlsConnector,
}

impl BenchTls {
    fn new(dir: &Path) -> Result<Self> {
        use tokio_rustls::rustls;
        std::fs::create_dir_all(dir)?;
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
        let (cert_pem, key_pem) = (certified.cert.pem(), certified.key_pair.serialize_pem());
        let (cert, key, combined) = (
            dir.join("bench.pem"),
            dir.join("bench.key"),
            dir.join("bench-combined.pem"),
        );
        std::fs::write(&cert, &cert_pem)?;
        std::fs::write(&key, &key_pem)?;
        std::fs::write(&combined, format!("{cert_pem}{key_pem}"))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(certified.cert.der().clone())?;
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256];
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        Ok(BenchTls {
            cert,
            key,
            combined,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }
}

/// The `{{TLS}}`/`{{TLS_FILES}}` lines of a peer's config: empty for ws://.
fn tls_directives(name: &str, tls: Option<&BenchTls>) -> (String, String) {
    let Some(tls) = tls else {
        return (String::new(), String::new());
    };
    match name {
        "haproxy.cfg" => (
            format!(" ssl crt {} alpn http/1.1", tls.combined.display()),
            String::new(),
        ),
        "nginx.conf" => (
            " ssl".into(),
            format!(
                "ssl_certificate {}; ssl_certificate_key {}; ssl_protocols TLSv1.2 TLSv1.3;",
                tls.cert.display(),
                tls.key.display()
            ),
        ),
        _ => (
            format!(
                "LoadModule ssl_module /usr/lib/apache2/modules/mod_ssl.so\n\
                 SSLEngine on\nSSLProtocol -all +TLSv1.2 +TLSv1.3\n\
                 SSLCertificateFile {}\nSSLCertificateKeyFile {}",
                tls.cert.display(),
                tls.key.display()
            ),
            String::new(),
        ),
    }
}

fn fill_template(
    name: &str,
    scenario: Scenario,
    tls: Option<&BenchTls>,
    dir: &Path,
    topology: Topology,
) -> Result<PathBuf> {
    let text = std::fs::read_to_string(root().join("bench/peers").join(name))?;
    let (tls_line, tls_files) = tls_directives(name, tls);
    let text = text
        .replace("{{LISTEN}}", &topology.listen.to_string())
        .replace("{{MEMBERS}}", &topology.members.to_string())
        .replace("{{PORT}}", &PROXY_PORT.to_string())
        .replace("{{M1}}", &MEMBER_PORTS[0].to_string())
        .replace("{{M2}}", &MEMBER_PORTS[1].to_string())
        .replace("{{M3}}", &MEMBER_PORTS[2].to_string())
        .replace("{{DIR}}", &dir.display().to_string())
        .replace("{{BALANCE}}", balance_directive(name, scenario.method()))
        .replace("{{THREADS}}", &apache_threads(scenario.held()).to_string())
        .replace("{{TLS_FILES}}", &tls_files)
        .replace("{{TLS}}", &tls_line);
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Apache's worker threads for a scenario: a tunnel keeps its thread for the connection's life,
/// so one per connection held plus room for handshakes in flight, and never fewer than 512
/// (more threads than a scenario needs cost Apache 15% of its throughput in quick runs).
fn apache_threads(held: usize) -> usize {
    (held + 64).max(512)
}

/// Starts a target pinned to core 0; `None` for direct.
fn start_target(
    target: Target,
    scenario: Scenario,
    tls: Option<&BenchTls>,
    dir: &Path,
    topology: Topology,
) -> Result<Option<Running>> {
    use std::os::unix::process::CommandExt;
    let proxy = (topology.listen, PROXY_PORT);
    if target != Target::Direct && std::net::TcpStream::connect(proxy).is_ok() {
        bail!("port {PROXY_PORT} is already in use (a target left from an earlier run?)");
    }
    let mut command = match topology.netns {
        Some(netns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", netns, "taskset", "-c", "0"]);
            command
        }
        None => {
            let mut command = Command::new("taskset");
            command.args(["-c", "0"]);
            command
        }
    };
    let members: Vec<String> = MEMBER_PORTS
        .iter()
        .map(|p| format!("ws://{}:{p}", topology.members))
        .collect();
    match target {
        Target::Direct => return Ok(None),
        Target::WspliceSockmap
        | Target::WspliceUserspace
        | Target::WspliceKernelTls
        | Target::WspliceSplice => {
            command.arg(root().join("target/release/wsplice")).args([
                "run",
                "--listen",
                &format!("{}:{PROXY_PORT}", topology.listen),
                "--workers",
                "1",
                "--dataplane",
                match target {
                    Target::WspliceSockmap => "sockmap",
                    Target::WspliceSplice => "splice",
                    _ => "userspace",
                },
                "--lbmethod",
                match scenario.method() {
                    Method::RoundRobin => "byrequests",
                    Method::LeastConn => "least-conn",
                },
            ]);
            for member in &members {
                command.args(["--member", member]);
            }
            if target == Target::WspliceKernelTls {
                command.arg("--kernel-tls");
            }
            if let Some(tls) = tls {
                command
                    .arg("--tls-cert")
                    .arg(&tls.cert)
                    .arg("--tls-key")
                    .arg(&tls.key);
            }
        }
        Target::Haproxy => {
            let config = fill_template("haproxy.cfg", scenario, tls, dir, topology)?;
            command.args(["haproxy", "-db", "-f"]).arg(config);
        }
        Target::Nginx => {
            let config = fill_template("nginx.conf", scenario, tls, dir, topology)?;
            command
                .args(["nginx", "-p"])
                .arg(dir)
                .arg("-c")
                .arg(config)
                .args(["-g", "daemon off;"]);
        }
        Target::Apache => {
            let config = fill_template("apache2.conf", scenario, tls, dir, topology)?;
            command.args(["apache2", "-DFOREGROUND", "-f"]).arg(config);
        }
    }
    command
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(dir.join("stderr.log"))?));
    command.process_group(0);
    let child = command
        .spawn()
        .with_context(|| format!("cannot start {}", target.name()))?;
    let running = Running { child };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(proxy).is_err() {
        if Instant::now() > deadline {
            bail!(
                "{} did not listen within 10 s (see {})",
                target.name(),
                dir.join("stderr.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Some(running))
}

/// CPU ticks (user + system) used by every process in `pgid`.
fn group_ticks(pgid: u32) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(after) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        let fields: Vec<&str> = after.split_whitespace().collect();
        // After "pid (comm)": state ppid pgrp ... utime is field 14, stime 15 (1-based overall).
        if fields.get(2).and_then(|f| f.parse::<u32>().ok()) == Some(pgid) {
            let utime: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0);
            let stime: u64 = fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
            total += utime + stime;
        }
    }
    total
}

/// Resident memory (KiB) of every process in `pgid`.
fn group_rss_kib(pgid: u32) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let in_group = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(2))
            .and_then(|f| f.parse::<u32>().ok())
            == Some(pgid);
        if !in_group {
            continue;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// Busy ticks of the whole machine (everything but idle and iowait).
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    total - fields.get(3).copied().unwrap_or(0) - fields.get(4).copied().unwrap_or(0)
}

const TICKS_PER_SECOND: f64 = 100.0;

/// One run of one scenario against one target.
#[derive(Debug, Clone, Default, Serialize)]
struct Sample {
    /// The scenario's headline figure (MB/s, handshakes/s, p99 µs, ...).
    value: f64,
    proxy_cpu_seconds: f64,
    machine_cpu_seconds: f64,
    /// GB carried by the proxy (both directions), or thousands of handshakes.
    work: f64,
    failures: u64,
    /// Idle: growth of the proxy's resident memory per held connection.
    rss_kib_per_connection: f64,
    /// Latency: the other percentiles, in microseconds.
    p50_us: f64,
    p999_us: f64,
    /// Balance: connections per member, in member order.
    split: String,
}

/// A figure shown beside the headline one.
#[derive(Debug, Clone, Serialize)]
struct Column {
    name: String,
    value: f64,
    shown: String,
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    scenario: String,
    target: String,
    unit: String,
    median: f64,
    min: f64,
    max: f64,
    columns: Vec<Column>,
    samples: Vec<Sample>,
}

/// How a balancing target spreads new connections.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Method {
    /// Weighted round robin: Apache byrequests, HAProxy roundrobin, nginx's default.
    RoundRobin,
    /// Fewest live connections: least-conn, leastconn, least_conn, Apache bybusyness.
    LeastConn,
}

#[derive(Clone, Copy)]
enum Scenario {
    Throughput {
        size: usize,
    },
    /// Round trips of `size` bytes on `CONCURRENT` connections, `rate` per second in all.
    Latency {
        size: usize,
        rate: u32,
    },
    Handshakes,
    /// Hold this many WebSockets, prove each still echoes, weigh the proxy's memory.
    Idle {
        connections: usize,
    },
    /// Where new connections go, one after another.
    Balance {
        method: Method,
    },
}

/// Connections the throughput, latency and handshake scenarios keep busy at once.
const CONCURRENT: usize = 50;

/// Connections the balance scenario opens first, and then after emptying one member.
const BALANCE_FIRST: usize = 300;
const BALANCE_REFILL: usize = 90;

impl Scenario {
    fn name(self) -> String {
        match self {
            Scenario::Throughput { size } => {
                format!(
                    "throughput, {CONCURRENT} connections, {} KiB messages",
                    size / 1024
                )
            }
            Scenario::Latency { size, rate } => format!(
                "latency, {CONCURRENT} connections, {} KiB messages, {rate} round trips/s in all",
                size / 1024
            ),
            Scenario::Handshakes => {
                format!("handshakes (connect, upgrade, one echo, close), {CONCURRENT} concurrent")
            }
            Scenario::Idle { connections } => {
                format!("idle: {connections} WebSockets held open, then each one echoes")
            }
            Scenario::Balance {
                method: Method::RoundRobin,
            } => format!(
                "balance, round robin (byrequests): {BALANCE_FIRST} connections opened one after another"
            ),
            Scenario::Balance {
                method: Method::LeastConn,
            } => format!(
                "balance, least connections: {BALANCE_FIRST} held, the first member's closed, {BALANCE_REFILL} more opened"
            ),
        }
    }

    fn method(self) -> Method {
        match self {
            Scenario::Balance { method } => method,
            _ => Method::RoundRobin,
        }
    }

    /// The most connections the scenario holds open at once.
    fn held(self) -> usize {
        match self {
            Scenario::Idle { connections } => connections,
            Scenario::Balance { .. } => BALANCE_FIRST + BALANCE_REFILL,
            _ => CONCURRENT,
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Scenario::Throughput { .. } => "echo MB/s",
            Scenario::Latency { .. } => "p99 µs",
            Scenario::Handshakes => "handshakes/s",
            Scenario::Idle { .. } => "connections held that echoed",
            Scenario::Balance {
                method: Method::RoundRobin,
            } => "largest miss of an even share, %",
            Scenario::Balance {
                method: Method::LeastConn,
            } => "refills that went to the emptied member, %",
        }
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// The value at `fraction` (0..1) of sorted `times`.
fn percentile(times: &[u32], fraction: f64) -> f64 {
    if times.is_empty() {
        return 0.0;
    }
    let index = ((times.len() as f64 * fraction) as usize).min(times.len() - 1);
    f64::from(times[index])
}

/// How long the idle scenario waits after opening connections before reading the RSS.
const SETTLE: Duration = Duration::from_secs(2);

/// Runs one scenario once against a running target; fills the scenario-specific parts of the
/// sample and returns the load's outcome.
async fn run_scenario(
    scenario: Scenario,
    targets: &[load::Endpoint],
    pgid: Option<u32>,
    duration: Duration,
    sample: &mut Sample,
) -> load::Outcome {
    match scenario {
        Scenario::Throughput { size } => {
            load::throughput(targets, CONCURRENT, size, 4, duration).await
        }
        Scenario::Latency { size, rate } => {
            // One message per connection per period: `rate` per second in all.
            let period = Duration::from_secs(CONCURRENT as u64) / rate;
            let (outcome, mut times) =
                load::latency(targets, CONCURRENT, period, size, duration).await;
            times.sort_unstable();
            sample.value = percentile(&times, 0.99);
            sample.p50_us = percentile(&times, 0.5);
            sample.p999_us = percentile(&times, 0.999);
            outcome
        }
        Scenario::Handshakes => load::handshakes(targets, CONCURRENT, duration).await,
        Scenario::Idle { connections } => {
            // The cost of one more connection: the growth between holding half and holding
            // all of them, so memory the concurrent handshakes needed once is not spread over
            // the connections.
            let started = Instant::now();
            let rss_empty = pgid.map_or(0, group_rss_kib);
            let half = connections / 2;
            let (mut streams, mut failed, mut first_failure) =
                load::open_many(targets, half, 200).await;
            // Steady state: every proxy done with the burst (wsplice hands pairs to the kernel
            // 250 ms after their 101, and gives the burst's memory back a second later).
            tokio::time::sleep(SETTLE).await;
            let rss_half = pgid.map_or(0, group_rss_kib);
            let held_half = streams.len() as u64;
            let (more, more_failed, more_failure) =
                load::open_many(targets, connections - half, 200).await;
            streams.extend(more);
            failed += more_failed;
            first_failure = first_failure.or(more_failure);
            let held = streams.len() as u64;
            tokio::time::sleep(SETTLE).await;
            let rss_all = pgid.map_or(0, group_rss_kib);
            sample.rss_kib_per_connection = if held > held_half {
                rss_all.saturating_sub(rss_half) as f64 / (held - held_half) as f64
            } else {
                // Nothing more was taken after the first half (a proxy at its limit): no
                // slope, so the average from an empty proxy.
                rss_all.saturating_sub(rss_empty) as f64 / held.max(1) as f64
            };
            let answered = load::echo_all(streams, 200).await;
            sample.value = answered as f64;
            load::Outcome {
                completed: answered,
                echoed_bytes: 0,
                failures: failed + (held - answered),
                elapsed: started.elapsed(),
                first_failure,
            }
        }
        Scenario::Balance { method } => {
            let started = Instant::now();
            let result = balance(&targets[0], method, sample).await;
            load::Outcome {
                completed: 1,
                failures: u64::from(result.is_err()),
                first_failure: result.err().map(|e| e.to_string()),
                elapsed: started.elapsed(),
                ..Default::default()
            }
        }
    }
}

fn count_per_member(members: impl Iterator<Item = u16>) -> [usize; 3] {
    let mut counts = [0; 3];
    for port in members {
        if let Some(index) = MEMBER_PORTS.iter().position(|p| *p == port) {
            counts[index] += 1;
        }
    }
    counts
}

fn shown_split(counts: [usize; 3]) -> String {
    counts.map(|c| c.to_string()).join("/")
}

/// Round robin: how far the split of sequentially opened connections is from even. Least
/// connections: after the first member's connections close, how many new ones go to it (all
/// of them should, until it holds as many as the others).
async fn balance(
    target: &load::Endpoint,
    method: Method,
    sample: &mut Sample,
) -> std::io::Result<()> {
    let opened = load::open_in_order(target, BALANCE_FIRST).await?;
    let first = count_per_member(opened.iter().map(|(_, m)| *m));
    let even = BALANCE_FIRST as f64 / 3.0;
    match method {
        Method::RoundRobin => {
            let worst = first
                .iter()
                .map(|c| (*c as f64 - even).abs() / even * 100.0)
                .fold(0.0, f64::max);
            sample.value = worst;
            sample.split = shown_split(first);
            for (stream, _) in opened {
                load::close(stream).await;
            }
        }
        Method::LeastConn => {
            let (emptied, kept): (Vec<_>, Vec<_>) = opened
                .into_iter()
                .partition(|(_, member)| *member == MEMBER_PORTS[0]);
            for (stream, _) in emptied {
                load::close(stream).await;
            }
            // Let the proxy see the closes before the refill.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let refill = load::open_in_order(target, BALANCE_REFILL).await?;
            let second = count_per_member(refill.iter().map(|(_, m)| *m));
            sample.value = second[0] as f64 / BALANCE_REFILL as f64 * 100.0;
            sample.split = format!("{} then {}", shown_split(first), shown_split(second));
            for (stream, _) in kept.into_iter().chain(refill) {
                load::close(stream).await;
            }
        }
    }
    Ok(())
}

/// The table row for one target and scenario from its runs.
fn summarize(scenario: Scenario, name: &str, target: Target, samples: Vec<Sample>) -> Row {
    let mut values: Vec<f64> = samples.iter().map(|s| s.value).collect();
    let median_of = |figure: &dyn Fn(&Sample) -> f64| {
        let mut figures: Vec<f64> = samples.iter().map(figure).collect();
        median(&mut figures)
    };
    let column = |name: &str, value: f64, decimals: usize| Column {
        name: name.into(),
        value,
        shown: format!("{value:.decimals$}"),
    };
    let per_work = |s: &Sample, seconds: f64| seconds / s.work.max(1e-9);
    let cpu_per = |unit: &str| {
        vec![
            column(
                &format!("proxy CPU s per {unit}"),
                median_of(&|s| per_work(s, s.proxy_cpu_seconds)),
                3,
            ),
            column(
                &format!("machine CPU s per {unit}"),
                median_of(&|s| per_work(s, s.machine_cpu_seconds)),
                3,
            ),
        ]
    };
    let failures = samples.iter().map(|s| s.failures).max().unwrap_or(0);
    let columns = match scenario {
        Scenario::Throughput { .. } => cpu_per("GB carried"),
        Scenario::Latency { .. } => {
            let mut columns = vec![
                column("p50 µs", median_of(&|s| s.p50_us), 0),
                column("p99.9 µs", median_of(&|s| s.p999_us), 0),
            ];
            columns.extend(cpu_per("GB carried"));
            columns
        }
        Scenario::Handshakes => cpu_per("1,000 handshakes"),
        Scenario::Idle { .. } => vec![
            column(
                "proxy RSS KiB per connection",
                median_of(&|s| s.rss_kib_per_connection),
                2,
            ),
            column("connections that failed", failures as f64, 0),
        ],
        Scenario::Balance { .. } => {
            // The split of the median run.
            let middle = samples
                .iter()
                .min_by(|a, b| {
                    let m = median(&mut values.clone());
                    (a.value - m).abs().total_cmp(&(b.value - m).abs())
                })
                .map(|s| s.split.clone())
                .unwrap_or_default();
            vec![
                Column {
                    name: "connections per member (median run)".into(),
                    value: 0.0,
                    shown: middle,
                },
                column("runs that failed", failures as f64, 0),
            ]
        }
    };
    Row {
        scenario: name.into(),
        target: target.name().into(),
        unit: scenario.unit().into(),
        median: median(&mut values),
        min: values[0],
        max: values[values.len() - 1],
        columns,
        samples,
    }
}

/// Set by SIGINT or SIGTERM: the run stops before its next measurement, so the target is
/// stopped and the namespace and the host's sysctl are put back by the usual drops.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Takes over SIGINT and SIGTERM (whose default would skip every clean-up) for `STOPPING`.
async fn stop_on_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        eprintln!("wsplice-bench: stopping after the current measurement, then cleaning up");
        STOPPING.store(true, Ordering::SeqCst);
    });
    Ok(())
}

/// Marks the result lines on the VM's console (`cargo xtask bench --vm` collects them).
const VM_RESULT_PREFIX: &str = "WSPLICE-RESULT ";

/// `cargo xtask bench` passes its arguments through; a mistyped one stops here instead of
/// starting a full run.
#[derive(clap::Parser)]
#[command(about = "wsplice benchmarks: every target, scenario by scenario")]
struct Arguments {
    /// One round of 3 s per scenario instead of three of 8 s.
    #[arg(long)]
    quick: bool,
    /// Only targets whose name contains this (case-insensitive), e.g. `sockmap`; repeat it or
    /// separate names with commas for several (`--only sockmap,haproxy`).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Only scenarios whose name starts with this (case-insensitive): `throughput`, `wss`,
    /// `handshakes` (ws:// only), `latency, 50 connections, 1 KiB messages, 5000`.
    #[arg(long)]
    scenario: Option<String>,
    /// Give the proxy's receive processing its own core (veth pair into a namespace).
    #[arg(long)]
    netns: bool,
    /// Rounds instead of the default (3; 1 with --quick): narrower medians for a focused
    /// comparison. Results go to partial.{json,md}.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    rounds: Option<u16>,
    /// Inside the VM (`cargo xtask bench --vm`): the rustls relay against kernel TLS + splice.
    #[arg(long, hide = true)]
    kernel_tls_vm: bool,
}

fn main() -> Result<()> {
    let Arguments {
        quick,
        only,
        scenario: only_scenario,
        netns,
        rounds,
        kernel_tls_vm,
    } = clap::Parser::parse();
    let runs = rounds.map_or(if quick { 1 } else { 3 }, usize::from);
    let seconds = if quick { 3 } else { 8 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(stop_on_signal())?;
    // Loopback is the default; --netns gives the proxy's receive processing its own core.
    let netns = if netns { Some(Netns::set_up()?) } else { None };
    let topology = if netns.is_some() { NETNS } else { LOOPBACK };
    let member_addresses: Vec<SocketAddr> = MEMBER_PORTS
        .iter()
        .map(|p| SocketAddr::from((topology.members, *p)))
        .collect();
    runtime.block_on(async {
        for address in &member_addresses {
            load::start_member(*address).await?;
        }
        anyhow::Ok(())
    })?;
    // (scenario, over wss://): every scenario over ws://, and the ones TLS changes over wss://.
    let wss_scenarios = [
        Scenario::Throughput { size: 64 * 1024 },
        Scenario::Latency {
            size: 1024,
            rate: 1_000,
        },
        Scenario::Handshakes,
        Scenario::Idle { connections: 7500 },
    ];
    let scenarios = [
        Scenario::Throughput { size: 64 * 1024 },
        Scenario::Throughput { size: 4 * 1024 },
        // A light and a moderate fixed rate: 1 and 5 MB/s each way.
        Scenario::Latency {
            size: 1024,
            rate: 1_000,
        },
        Scenario::Latency {
            size: 1024,
            rate: 5_000,
        },
        Scenario::Handshakes,
        // Both ends live in this process (20,000 descriptors) and HAProxy takes 7,900.
        Scenario::Idle { connections: 7500 },
        Scenario::Balance {
            method: Method::RoundRobin,
        },
        Scenario::Balance {
            method: Method::LeastConn,
        },
    ];
    let work_dir = std::env::temp_dir().join(format!("wsplice-bench-{}", std::process::id()));
    let bench_tls = BenchTls::new(&work_dir.join("tls"))?;
    // In the VM, ws:// too: what splicing costs against the relay's copies without crypto.
    let cases: Vec<(Scenario, bool)> = if kernel_tls_vm {
        [
            (Scenario::Throughput { size: 64 * 1024 }, false),
            (Scenario::Throughput { size: 64 * 1024 }, true),
            (Scenario::Throughput { size: 4 * 1024 }, true),
        ]
        .into()
    } else {
        scenarios
            .into_iter()
            .map(|scenario| (scenario, false))
            .chain(wss_scenarios.into_iter().map(|scenario| (scenario, true)))
            .collect()
    };

    let bench = Bench {
        runtime: &runtime,
        work_dir,
        topology,
        member_addresses,
        seconds,
    };
    let mut rows = Vec::new();
    for (scenario, wss) in cases {
        let name = if wss {
            format!("wss:// {}", scenario.name())
        } else {
            scenario.name()
        };
        // The start of the name, so `handshakes` leaves out `wss:// handshakes`.
        if only_scenario
            .as_deref()
            .is_some_and(|f| !name.to_lowercase().starts_with(&f.to_lowercase()))
        {
            continue;
        }
        let tls = wss.then_some(&bench_tls);
        let targets: &[Target] = match (kernel_tls_vm, wss) {
            (true, true) => &[Target::WspliceUserspace, Target::WspliceKernelTls],
            (true, false) => &[Target::WspliceUserspace, Target::WspliceSplice],
            (false, _) => &Target::ALL,
        };
        let mut chosen = Vec::new();
        for &target in targets {
            // Balancing needs a balancer; the members speak ws:// only.
            let balancing = matches!(scenario, Scenario::Balance { .. });
            // On the host, splice mode only where it moves bytes differently from the relay:
            // ws:// throughput, latency and handshakes (its wss:// pairs go to rustls).
            let splice_adds_nothing = !kernel_tls_vm
                && target == Target::WspliceSplice
                && (wss || balancing || matches!(scenario, Scenario::Idle { .. }));
            let chosen_by_name = only.is_empty()
                || only
                    .iter()
                    .any(|f| target.name().to_lowercase().contains(&f.to_lowercase()));
            if !chosen_by_name
                || ((balancing || wss) && target == Target::Direct)
                || splice_adds_nothing
            {
                continue;
            }
            chosen.push(target);
        }
        // Round by round, every target once per round: a slow spell of the machine then
        // touches every target alike instead of the runs of one. Each round starts one
        // target further on, so no target always runs after the same one (a run leaves its
        // TIME_WAIT sockets and ports behind for the next).
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); chosen.len()];
        for round in 0..runs {
            for offset in 0..chosen.len() {
                let index = (round + offset) % chosen.len();
                if STOPPING.load(Ordering::SeqCst) {
                    bail!("stopped by a signal; nothing written");
                }
                let sample = bench.measure(scenario, &name, chosen[index], tls)?;
                samples[index].push(sample);
            }
        }
        for (target, samples) in chosen.into_iter().zip(samples) {
            rows.push(summarize(scenario, &name, target, samples));
        }
    }
    drop(netns);
    // Only a full, unfiltered run replaces the published results.
    let name = if kernel_tls_vm {
        "vm-kernel-tls"
    } else if quick || !only.is_empty() || only_scenario.is_some() || rounds.is_some() {
        "partial"
    } else if topology.netns.is_some() {
        "latest-netns"
    } else {
        "latest"
    };
    // The command as a user types it: the VM's inner flag stands for xtask's --vm.
    let command: String = std::env::args()
        .skip(1)
        .map(|a| match a.as_str() {
            "--kernel-tls-vm" => " --vm".to_string(),
            _ if a.contains(' ') => format!(" '{a}'"),
            _ => format!(" {a}"),
        })
        .collect();
    write_results(&rows, name, &command, runs, seconds, topology)
}

/// What every measurement shares.
struct Bench<'a> {
    runtime: &'a tokio::runtime::Runtime,
    work_dir: PathBuf,
    topology: Topology,
    member_addresses: Vec<SocketAddr>,
    seconds: u64,
}

impl Bench<'_> {
    /// Runs `scenario` once against a fresh `target`.
    fn measure(
        &self,
        scenario: Scenario,
        name: &str,
        target: Target,
        tls: Option<&BenchTls>,
    ) -> Result<Sample> {
        // A fresh proxy per run: nothing carried over between measurements.
        let dir = self.work_dir.join(format!("{:?}", target).to_lowercase());
        std::fs::create_dir_all(&dir)?;
        let running = start_target(target, scenario, tls, &dir, self.topology)?;
        let pgid = running.as_ref().map(|r| r.child.id());
        let addresses = if target == Target::Direct {
            self.member_addresses.clone()
        } else {
            vec![SocketAddr::from((self.topology.listen, PROXY_PORT))]
        };
        let targets: Vec<load::Endpoint> = addresses
            .into_iter()
            .map(|address| load::Endpoint {
                address,
                tls: tls.map(|tls| tls.connector.clone()),
            })
            .collect();
        let proxy_before = pgid.map_or(0, group_ticks);
        let machine_before = machine_busy_ticks();
        let mut sample = Sample::default();
        let outcome = self.runtime.block_on(run_scenario(
            scenario,
            &targets,
            pgid,
            Duration::from_secs(self.seconds),
            &mut sample,
        ));
        sample.proxy_cpu_seconds =
            (pgid.map_or(0, group_ticks) - proxy_before) as f64 / TICKS_PER_SECOND;
        sample.machine_cpu_seconds =
            (machine_busy_ticks() - machine_before) as f64 / TICKS_PER_SECOND;
        drop(running);
        if let Some(why) = &outcome.first_failure {
            eprintln!(
                "{} / {}: {} failures, first: {why}",
                target.name(),
                name,
                outcome.failures
            );
        }
        let elapsed = outcome.elapsed.as_secs_f64();
        match scenario {
            Scenario::Throughput { .. } => {
                sample.value = outcome.echoed_bytes as f64 / 1e6 / elapsed;
                sample.work = 2.0 * outcome.echoed_bytes as f64 / 1e9;
            }
            Scenario::Latency { .. } => {
                sample.work = 2.0 * outcome.echoed_bytes as f64 / 1e9;
            }
            Scenario::Handshakes => {
                sample.value = outcome.completed as f64 / elapsed;
                sample.work = outcome.completed as f64 / 1000.0;
            }
            Scenario::Idle { .. } | Scenario::Balance { .. } => {}
        }
        sample.failures = outcome.failures;
        eprintln!(
            "{:<20} {:<70} {:>10.0} {}  proxy CPU {:.2} s, machine CPU {:.2} s, failures {}",
            target.name(),
            name,
            sample.value,
            sample.split,
            sample.proxy_cpu_seconds,
            sample.machine_cpu_seconds,
            outcome.failures
        );
        Ok(sample)
    }
}

/// Writes bench/results/NAME.{json,md} and prints the markdown; in the VM, whose files do
/// not outlive it, each line goes to the console with a prefix the host collects.
fn write_results(
    rows: &[Row],
    name: &str,
    command: &str,
    runs: usize,
    seconds: u64,
    topology: Topology,
) -> Result<()> {
    let dir = root().join("bench/results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(rows)?,
    )?;
    let mut markdown = format!(
        "# wsplice benchmark results\n\n`cargo xtask bench{command}`: {runs} round(s), each running every target once for \
         {seconds} s per scenario (each round starting one target further on), a fresh proxy per run, proxy pinned to core 0, load and echo members on core 1; {}. \
         Machine: {} cores, kernel {}.\n",
        if name == "vm-kernel-tls" {
            "everything on loopback inside the test VM (Debian's stock kernel under qemu, an \
             emulated CPU under TCG: compare the rows with each other, not with the host's)"
        } else if topology.netns.is_some() {
            "the proxy in its own network namespace behind a veth pair (64 KiB MTU), each side's \
             receive processing in a threaded NAPI pinned to its core: the proxy side's to core 0, \
             the load side's to core 1"
        } else {
            "everything on loopback, where the kernel's receive processing runs on the sender's core"
        },
        std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .filter(|line| line.starts_with("processor"))
            .count(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
    );
    let mut scenario = String::new();
    for row in rows {
        if row.scenario != scenario {
            scenario = row.scenario.clone();
            let names: String = row
                .columns
                .iter()
                .map(|c| format!(" {} |", c.name))
                .collect();
            let rule = "---|".repeat(row.columns.len() + 2);
            let note = if scenario.contains("idle") {
                "RSS per connection: growth of the proxy's resident memory from holding half of \
                 the connections to holding all of them, per connection added.\n\n"
            } else {
                ""
            };
            markdown.push_str(&format!(
                "\n## {scenario}\n\n{note}| target | {} (median, min-max) |{names}\n|{rule}\n",
                row.unit
            ));
        }
        let shown: String = row
            .columns
            .iter()
            .map(|c| format!(" {} |", c.shown))
            .collect();
        markdown.push_str(&format!(
            "| {} | {:.0} ({:.0}-{:.0}) |{shown}\n",
            row.target, row.median, row.min, row.max
        ));
    }
    std::fs::write(dir.join(format!("{name}.md")), &markdown)?;
    if name == "vm-kernel-tls" {
        for line in markdown.lines() {
            println!("{VM_RESULT_PREFIX}{line}");
        }
    } else {
        println!("{markdown}");
    }
    Ok(())
}
