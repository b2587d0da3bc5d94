//! wsplice benchmarks: starts echo members and each target (pinned to core 0; this process,
//! with the load and the members, runs on the other cores), runs the scenarios, and writes
//! bench/results/latest.{json,md}. Run through `cargo xtask bench [--quick]`.
#![forbid(unsafe_code)]

mod load;
mod ws;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

/// The proxy in its own network namespace behind a veth pair, with receive packet steering
/// putting the proxy side's receive processing on core 0 and the load side's on core 1, as
/// NIC queues would on an edge node. Addresses exist only inside namespaces made here.
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

/// Creates (anew) the proxy's namespace and the veth pair to it.
fn set_up_netns() -> Result<()> {
    let _ = sh("ip netns del wsplice-bench 2>/dev/null; ip link del wsb-host 2>/dev/null");
    sh("ip netns add wsplice-bench")?;
    sh("ip link add wsb-host type veth peer name wsb-proxy")?;
    sh("ip link set wsb-proxy netns wsplice-bench")?;
    sh("ip addr add 10.77.0.1/24 dev wsb-host && ip link set wsb-host up")?;
    sh(
        "ip netns exec wsplice-bench sh -c 'ip addr add 10.77.0.2/24 dev wsb-proxy && ip link set wsb-proxy up && ip link set lo up'",
    )?;
    // Receive steering: packets for the proxy are processed on core 0, for the load on core 1.
    sh("echo 2 > /sys/class/net/wsb-host/queues/rx-0/rps_cpus")?;
    sh(
        "ip netns exec wsplice-bench sh -c 'echo 1 > /sys/class/net/wsb-proxy/queues/rx-0/rps_cpus'",
    )?;
    Ok(())
}

fn tear_down_netns() {
    let _ = sh("ip netns del wsplice-bench 2>/dev/null; ip link del wsb-host 2>/dev/null");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Direct,
    WspliceSockmap,
    WspliceUserspace,
    Haproxy,
    Nginx,
    Apache,
}

impl Target {
    const ALL: [Target; 6] = [
        Target::Direct,
        Target::WspliceSockmap,
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

fn fill_template(name: &str, dir: &Path, topology: Topology) -> Result<PathBuf> {
    let text = std::fs::read_to_string(root().join("bench/peers").join(name))?;
    let text = text
        .replace("{{LISTEN}}", &topology.listen.to_string())
        .replace("{{MEMBERS}}", &topology.members.to_string())
        .replace("{{PORT}}", &PROXY_PORT.to_string())
        .replace("{{M1}}", &MEMBER_PORTS[0].to_string())
        .replace("{{M2}}", &MEMBER_PORTS[1].to_string())
        .replace("{{M3}}", &MEMBER_PORTS[2].to_string())
        .replace("{{DIR}}", &dir.display().to_string());
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Starts a target pinned to core 0; `None` for direct.
fn start_target(target: Target, dir: &Path, topology: Topology) -> Result<Option<Running>> {
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
        Target::WspliceSockmap | Target::WspliceUserspace => {
            command.arg(root().join("target/release/wsplice")).args([
                "run",
                "--listen",
                &format!("{}:{PROXY_PORT}", topology.listen),
                "--workers",
                "1",
                "--dataplane",
                if target == Target::WspliceSockmap {
                    "sockmap"
                } else {
                    "userspace"
                },
            ]);
            for member in &members {
                command.args(["--member", member]);
            }
        }
        Target::Haproxy => {
            let config = fill_template("haproxy.cfg", dir, topology)?;
            command.args(["haproxy", "-db", "-f"]).arg(config);
        }
        Target::Nginx => {
            let config = fill_template("nginx.conf", dir, topology)?;
            command
                .args(["nginx", "-p"])
                .arg(dir)
                .arg("-c")
                .arg(config)
                .args(["-g", "daemon off;"]);
        }
        Target::Apache => {
            let config = fill_template("apache2.conf", dir, topology)?;
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

#[derive(Debug, Clone, Serialize)]
struct Sample {
    value: f64,
    proxy_cpu_seconds: f64,
    machine_cpu_seconds: f64,
    /// GB carried by the proxy (both directions), or thousands of handshakes.
    work: f64,
    failures: u64,
    /// Idle scenario: growth of the proxy's resident memory per held connection.
    rss_kib_per_connection: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    scenario: String,
    target: String,
    unit: String,
    first_column: String,
    second_column: String,
    median: f64,
    min: f64,
    max: f64,
    first: f64,
    second: f64,
    samples: Vec<Sample>,
}

#[derive(Clone, Copy)]
enum Scenario {
    Throughput {
        size: usize,
    },
    Handshakes,
    /// Hold this many WebSockets, prove each still echoes, weigh the proxy's memory.
    Idle {
        connections: usize,
    },
}

impl Scenario {
    fn name(self) -> String {
        match self {
            Scenario::Throughput { size } => {
                format!("throughput, 50 connections, {} KiB messages", size / 1024)
            }
            Scenario::Handshakes => {
                "handshakes (connect, upgrade, one echo, close), 50 concurrent".into()
            }
            Scenario::Idle { connections } => {
                format!("idle: {connections} WebSockets held open, then each one echoes")
            }
        }
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let runs = if quick { 1 } else { 3 };
    let seconds = if quick { 3 } else { 8 };
    let only: Option<String> = std::env::args().skip_while(|a| a != "--only").nth(1);
    // Loopback is the default; --netns (experimental: veth costs every target a lot, and
    // HAProxy's handshake rate collapses there for a reason not yet understood) gives the
    // proxy's receive processing its own core.
    let topology = if std::env::args().any(|a| a == "--netns") {
        set_up_netns()?;
        NETNS
    } else {
        LOOPBACK
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
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
    let scenarios = [
        Scenario::Throughput { size: 64 * 1024 },
        Scenario::Throughput { size: 4 * 1024 },
        Scenario::Handshakes,
        // Both ends live in this process (20,000 descriptors) and HAProxy takes 7,900.
        Scenario::Idle { connections: 7500 },
    ];
    let work_dir = std::env::temp_dir().join(format!("wsplice-bench-{}", std::process::id()));
    let mut rows = Vec::new();
    for scenario in scenarios {
        for target in Target::ALL {
            if only
                .as_deref()
                .is_some_and(|o| !target.name().to_lowercase().contains(&o.to_lowercase()))
            {
                continue;
            }
            let mut samples = Vec::new();
            for _ in 0..runs {
                // A fresh proxy per run: nothing carried over between measurements.
                let dir = work_dir.join(format!("{:?}", target).to_lowercase());
                std::fs::create_dir_all(&dir)?;
                let running = start_target(target, &dir, topology)?;
                let pgid = running.as_ref().map(|r| r.child.id());
                let targets = if target == Target::Direct {
                    member_addresses.clone()
                } else {
                    vec![SocketAddr::from((topology.listen, PROXY_PORT))]
                };
                let proxy_before = pgid.map_or(0, group_ticks);
                let machine_before = machine_busy_ticks();
                let duration = Duration::from_secs(seconds);
                let mut rss_per_connection = 0.0;
                let outcome = runtime.block_on(async {
                    match scenario {
                        Scenario::Throughput { size } => {
                            load::throughput(&targets, 50, size, 4, duration).await
                        }
                        Scenario::Handshakes => load::handshakes(&targets, 50, duration).await,
                        Scenario::Idle { connections } => {
                            // The cost of one more connection: the growth between holding half
                            // and holding all of them, so memory the concurrent handshakes
                            // needed once is not spread over the connections.
                            let started = Instant::now();
                            let rss_empty = pgid.map_or(0, group_rss_kib);
                            let half = connections / 2;
                            let (mut streams, mut failed, mut first_failure) =
                                load::open_many(&targets, half, 200).await;
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            let rss_half = pgid.map_or(0, group_rss_kib);
                            let held_half = streams.len() as u64;
                            let (more, more_failed, more_failure) =
                                load::open_many(&targets, connections - half, 200).await;
                            streams.extend(more);
                            failed += more_failed;
                            first_failure = first_failure.or(more_failure);
                            let held = streams.len() as u64;
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            let rss_all = pgid.map_or(0, group_rss_kib);
                            rss_per_connection = if held > held_half {
                                rss_all.saturating_sub(rss_half) as f64 / (held - held_half) as f64
                            } else {
                                // Nothing more was taken after the first half (a proxy at its
                                // limit): no slope, so the average from an empty proxy.
                                rss_all.saturating_sub(rss_empty) as f64 / held.max(1) as f64
                            };
                            let answered = load::echo_all(streams, 200).await;
                            load::Outcome {
                                completed: answered,
                                echoed_bytes: 0,
                                failures: failed + (held - answered),
                                elapsed: started.elapsed(),
                                first_failure,
                            }
                        }
                    }
                });
                let proxy_seconds =
                    (pgid.map_or(0, group_ticks) - proxy_before) as f64 / TICKS_PER_SECOND;
                let machine_seconds =
                    (machine_busy_ticks() - machine_before) as f64 / TICKS_PER_SECOND;
                drop(running);
                if let Some(why) = &outcome.first_failure {
                    eprintln!(
                        "{} / {}: {} failures, first: {why}",
                        target.name(),
                        scenario.name(),
                        outcome.failures
                    );
                }
                let elapsed = outcome.elapsed.as_secs_f64();
                let (value, work) = match scenario {
                    Scenario::Throughput { .. } => (
                        outcome.echoed_bytes as f64 / 1e6 / elapsed,
                        2.0 * outcome.echoed_bytes as f64 / 1e9,
                    ),
                    Scenario::Handshakes => (
                        outcome.completed as f64 / elapsed,
                        outcome.completed as f64 / 1000.0,
                    ),
                    Scenario::Idle { .. } => (outcome.completed as f64, 0.0),
                };
                eprintln!(
                    "{:<20} {:<70} {value:>10.0}  proxy CPU {proxy_seconds:.2} s, machine CPU {machine_seconds:.2} s, failures {}",
                    target.name(),
                    scenario.name(),
                    outcome.failures
                );
                samples.push(Sample {
                    value,
                    proxy_cpu_seconds: proxy_seconds,
                    machine_cpu_seconds: machine_seconds,
                    work,
                    failures: outcome.failures,
                    rss_kib_per_connection: rss_per_connection,
                });
            }
            let mut values: Vec<f64> = samples.iter().map(|s| s.value).collect();
            let mut proxy: Vec<f64> = samples
                .iter()
                .map(|s| s.proxy_cpu_seconds / s.work.max(1e-9))
                .collect();
            let mut machine: Vec<f64> = samples
                .iter()
                .map(|s| s.machine_cpu_seconds / s.work.max(1e-9))
                .collect();
            let (unit, first_column, second_column) = match scenario {
                Scenario::Throughput { .. } => (
                    "echo MB/s",
                    "proxy CPU s per GB carried",
                    "machine CPU s per GB carried",
                ),
                Scenario::Handshakes => (
                    "handshakes/s",
                    "proxy CPU s per 1,000 handshakes",
                    "machine CPU s per 1,000 handshakes",
                ),
                Scenario::Idle { .. } => (
                    "connections held that echoed",
                    "proxy RSS KiB per connection",
                    "connections that failed",
                ),
            };
            let (first, second) = match scenario {
                Scenario::Idle { .. } => {
                    let mut rss: Vec<f64> =
                        samples.iter().map(|s| s.rss_kib_per_connection).collect();
                    let failed = samples.iter().map(|s| s.failures).max().unwrap_or(0);
                    (median(&mut rss), failed as f64)
                }
                _ => (median(&mut proxy), median(&mut machine)),
            };
            rows.push(Row {
                scenario: scenario.name(),
                target: target.name().into(),
                unit: unit.into(),
                first_column: first_column.into(),
                second_column: second_column.into(),
                median: median(&mut values),
                min: values[0],
                max: values[values.len() - 1],
                first,
                second,
                samples,
            });
        }
    }
    if topology.netns.is_some() {
        tear_down_netns();
    }
    write_results(&rows, quick, only.is_some(), runs, seconds, topology)
}

fn write_results(
    rows: &[Row],
    quick: bool,
    partial: bool,
    runs: usize,
    seconds: u64,
    topology: Topology,
) -> Result<()> {
    let dir = root().join("bench/results");
    std::fs::create_dir_all(&dir)?;
    // Only a full, unfiltered run replaces the published results.
    let name = if quick || partial {
        "partial"
    } else {
        "latest"
    };
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(rows)?,
    )?;
    let mut markdown = format!(
        "# wsplice benchmark results\n\n`cargo xtask bench{}{}`: {runs} run(s) of {seconds} s per target and \
         scenario, a fresh proxy per run, proxy pinned to core 0, load and echo members on core 1; {}. \
         Machine: {} cores, kernel {}.\n",
        if quick { " --quick" } else { "" },
        if topology.netns.is_some() {
            " --netns"
        } else {
            ""
        },
        if topology.netns.is_some() {
            "the proxy in its own network namespace behind a veth pair, receive processing for the \
             proxy side steered to core 0 (RPS) and for the load side to core 1"
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
            markdown.push_str(&format!(
                "\n## {scenario}\n\n| target | {} (median, min-max) | {} | {} |\n|---|---|---|---|\n",
                row.unit, row.first_column, row.second_column
            ));
        }
        markdown.push_str(&format!(
            "| {} | {:.0} ({:.0}-{:.0}) | {:.3} | {:.3} |\n",
            row.target, row.median, row.min, row.max, row.first, row.second
        ));
    }
    std::fs::write(dir.join(format!("{name}.md")), &markdown)?;
    println!("{markdown}");
    Ok(())
}
