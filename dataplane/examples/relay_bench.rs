//! Does io_uring pay for the userspace relay? Moves the same bytes both ways through one pair
//! with each relay on a dedicated thread, and reports the relay's CPU time per GB: the whole
//! process's CPU less what the load threads used themselves, so io_uring's kernel workers
//! (threads of this process) are counted against the relay.
//!
//! `cargo run --release -p wsplice-dataplane --example relay_bench [GiB each way] [runs]`
//! (or `cargo xtask relay-bench`), results to bench/results/relay.md.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use wsplice::sys::uring::{self, Copy};
use wsplice::sys::{process_cpu_time, thread_cpu_time};

#[derive(Debug, Clone, Copy)]
enum Relay {
    Tokio,
    UringReadWrite,
    UringSplice,
}

impl Relay {
    fn name(self) -> &'static str {
        match self {
            Relay::Tokio => "tokio (epoll) read/write, 64 KiB buffers",
            Relay::UringReadWrite => "io_uring read/write, 64 KiB buffers",
            Relay::UringSplice => "io_uring splice through pipes",
        }
    }
}

/// A connected loopback pair.
fn socket_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let near = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (far, _) = listener.accept().unwrap();
    (near, far)
}

/// Writes `bytes` then sends FIN; reads to EOF; returns the bytes read and the CPU time both
/// of its threads used.
fn endpoint(stream: TcpStream, bytes: u64) -> thread::JoinHandle<(u64, Duration)> {
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let cpu = thread_cpu_time();
        let chunk = vec![0x5au8; 256 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            writer.write_all(&chunk[..n]).unwrap();
            left -= n as u64;
        }
        writer.shutdown(Shutdown::Write).unwrap();
        thread_cpu_time() - cpu
    });
    thread::spawn(move || {
        let cpu = thread_cpu_time();
        let mut reader = stream;
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(error) => panic!("endpoint read: {error}"),
            }
        }
        let reader_cpu = thread_cpu_time() - cpu;
        (total, sender.join().unwrap() + reader_cpu)
    })
}

/// One run: returns (wall time, relay thread CPU time, relay CPU time with io_uring workers).
fn run(relay: Relay, bytes: u64) -> (Duration, Duration, Duration) {
    let (client_end, proxy_client) = socket_pair();
    let (proxy_member, member_end) = socket_pair();
    let process_before = process_cpu_time();
    let started = Instant::now();
    let relay_thread = thread::spawn(move || {
        let cpu_before = thread_cpu_time();
        let moved = match relay {
            Relay::Tokio => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    proxy_client.set_nonblocking(true).unwrap();
                    proxy_member.set_nonblocking(true).unwrap();
                    let mut client = tokio::net::TcpStream::from_std(proxy_client).unwrap();
                    let mut member = tokio::net::TcpStream::from_std(proxy_member).unwrap();
                    wsplice::relay::copy_pair(&mut client, &mut member)
                        .await
                        .unwrap()
                })
            }
            Relay::UringReadWrite => {
                uring::relay(&proxy_client, &proxy_member, Copy::ReadWrite).unwrap()
            }
            Relay::UringSplice => uring::relay(&proxy_client, &proxy_member, Copy::Splice).unwrap(),
        };
        (thread_cpu_time() - cpu_before, moved)
    });
    let client = endpoint(client_end, bytes);
    let member = endpoint(member_end, bytes);
    let (client_got, client_cpu) = client.join().unwrap();
    let (member_got, member_cpu) = member.join().unwrap();
    assert_eq!(client_got, bytes, "client got every byte");
    assert_eq!(member_got, bytes, "member got every byte");
    let (cpu, moved) = relay_thread.join().unwrap();
    let wall = started.elapsed();
    assert_eq!(moved, (bytes, bytes));
    let relay_total = (process_cpu_time() - process_before).saturating_sub(client_cpu + member_cpu);
    (wall, cpu, relay_total)
}

fn median(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(|a, b| a.total_cmp(b));
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

fn main() {
    let mut args = std::env::args().skip(1);
    let gib: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1.0);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let bytes = (gib * (1u64 << 30) as f64) as u64;
    let gb_moved = 2.0 * bytes as f64 / 1e9;
    let mut table = String::from(
        "| relay | MB/s (median, min-max) | relay thread CPU s/GB | relay CPU s/GB incl. io_uring workers |\n|---|---|---|---|\n",
    );
    for relay in [Relay::Tokio, Relay::UringReadWrite, Relay::UringSplice] {
        let mut rates = Vec::new();
        let mut cpu_per_gb = Vec::new();
        let mut total_per_gb = Vec::new();
        for _ in 0..runs {
            let (wall, cpu, total) = run(relay, bytes);
            rates.push(gb_moved * 1000.0 / wall.as_secs_f64());
            cpu_per_gb.push(cpu.as_secs_f64() / gb_moved);
            total_per_gb.push(total.as_secs_f64() / gb_moved);
        }
        let (rate, rate_min, rate_max) = median(rates);
        let (cpu, cpu_min, cpu_max) = median(cpu_per_gb);
        let (total, total_min, total_max) = median(total_per_gb);
        let line = format!(
            "| {} | {rate:.0} ({rate_min:.0}-{rate_max:.0}) | {cpu:.3} ({cpu_min:.3}-{cpu_max:.3}) | {total:.3} ({total_min:.3}-{total_max:.3}) |\n",
            relay.name()
        );
        eprint!("{line}");
        table.push_str(&line);
    }
    let report = format!(
        "# Userspace relay: tokio vs io_uring\n\n\
         One loopback pair, {gib} GiB each way at once, {runs} runs per relay ({gb_moved:.2} GB\n\
         moved per run). The relay runs on its own thread; CPU is given per GB moved, once for\n\
         that thread alone (CLOCK_THREAD_CPUTIME_ID) and once as the whole process's CPU less\n\
         what the load threads used, which counts io_uring's kernel worker threads against the\n\
         relay. Command: `cargo xtask relay-bench`.\n\n{table}"
    );
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/results/relay.md");
    std::fs::create_dir_all(concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/results")).unwrap();
    std::fs::write(path, &report).unwrap();
    println!("{report}");
}
