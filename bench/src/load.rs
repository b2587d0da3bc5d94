//! Echo members and the load scenarios. Every echoed message is compared with what was sent.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::ws;

/// Starts a WebSocket echo member on `address`: answers the upgrade, then echoes bytes.
pub async fn start_member(address: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(address).await?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(early) = ws::accept(&mut stream, address.port()).await else {
                    return;
                };
                if stream.write_all(&early).await.is_err() {
                    return;
                }
                if echo(&mut stream).await.is_ok() {
                    let _ = stream.shutdown().await;
                }
            });
        }
    });
    Ok(())
}

/// The most a member reads, and writes back, at once: more than the largest message.
const ECHO_BUFFER_MAX: usize = 256 * 1024;

/// Writes back what `stream` receives until it ends. Whatever has arrived goes back in one
/// write, a 64 KiB message whole as a WebSocket server sends it (not in the 8 KiB pieces of
/// `tokio::io::copy`, with which direct's 64 KiB echo ran at half the rate). The buffer
/// starts small and doubles while reads fill it, so short-lived connections stay cheap.
async fn echo(stream: &mut TcpStream) -> io::Result<()> {
    let mut buffer = vec![0u8; 8 * 1024];
    loop {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            return Ok(());
        }
        stream.write_all(&buffer[..read]).await?;
        if read == buffer.len() && buffer.len() < ECHO_BUFFER_MAX {
            buffer.resize(buffer.len() * 2, 0);
        }
    }
}

/// What one scenario run produced.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// Messages or handshakes completed and checked.
    pub completed: u64,
    /// Payload bytes echoed back and checked (each crossed the proxy twice).
    pub echoed_bytes: u64,
    pub failures: u64,
    pub elapsed: Duration,
    pub first_failure: Option<String>,
}

struct Counters {
    completed: AtomicU64,
    bytes: AtomicU64,
    failures: AtomicU64,
    first_failure: std::sync::Mutex<Option<String>>,
}

impl Counters {
    fn new() -> Arc<Self> {
        Arc::new(Counters {
            completed: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            first_failure: std::sync::Mutex::new(None),
        })
    }

    fn fail(&self, why: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.first_failure.lock().unwrap().get_or_insert(why);
    }

    fn outcome(&self, elapsed: Duration) -> Outcome {
        Outcome {
            completed: self.completed.load(Ordering::Relaxed),
            echoed_bytes: self.bytes.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            elapsed,
            first_failure: self.first_failure.lock().unwrap().clone(),
        }
    }
}

/// Where the load connects: an address, and TLS (wss://) when a connector is given.
#[derive(Clone)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub tls: Option<TlsConnector>,
}

/// A connection to an endpoint: plain TCP or TLS over it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type Conn = Box<dyn Io>;

async fn open(target: &Endpoint) -> io::Result<Conn> {
    Ok(open_identified(target).await?.0)
}

/// Opens a WebSocket (TLS first for wss://); returns it and the port of the member that
/// answered.
async fn open_identified(target: &Endpoint) -> io::Result<(Conn, u16)> {
    let stream = TcpStream::connect(target.address).await?;
    stream.set_nodelay(true)?;
    let mut stream: Conn = match &target.tls {
        None => Box::new(stream),
        Some(connector) => {
            let name = ServerName::try_from("localhost").map_err(io::Error::other)?;
            Box::new(connector.connect(name, stream).await?)
        }
    };
    let (early, member) = ws::connect(&mut stream, &target.address.to_string()).await?;
    if !early.is_empty() {
        return Err(io::Error::other("bytes before the first message"));
    }
    let member = member.ok_or_else(|| io::Error::other("the 101 names no member"))?;
    Ok((stream, member))
}

/// Echo throughput: `connections` WebSockets, each keeping `window` messages of `size` bytes in
/// flight, for `duration`. Targets are used round robin (one for a proxy, the members for
/// direct).
pub async fn throughput(
    targets: &[Endpoint],
    connections: usize,
    size: usize,
    window: usize,
    duration: Duration,
) -> Outcome {
    let counters = Counters::new();
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for index in 0..connections {
        let target = targets[index % targets.len()].clone();
        let counters = Arc::clone(&counters);
        tasks.push(tokio::spawn(async move {
            if let Err(error) = echo_connection(&target, size, window, deadline, &counters).await {
                counters.fail(format!("connection {index}: {error}"));
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    counters.outcome(started.elapsed())
}

async fn echo_connection(
    target: &Endpoint,
    size: usize,
    window: usize,
    deadline: Instant,
    counters: &Counters,
) -> io::Result<()> {
    let stream = open(target).await?;
    let (mut reader, mut writer) = tokio::io::split(stream);
    let permits = Arc::new(Semaphore::new(window));
    let sent = Arc::new(AtomicU64::new(0));
    let writer_task = {
        let (permits, sent) = (Arc::clone(&permits), Arc::clone(&sent));
        tokio::spawn(async move {
            let mut sequence = 0u64;
            while Instant::now() < deadline {
                let Ok(permit) = permits.acquire().await else {
                    break;
                };
                permit.forget();
                writer.write_all(&ws::frame(size, sequence)).await?;
                sequence += 1;
                sent.store(sequence, Ordering::Release);
            }
            // Close only once every message in flight has come back: nginx ends the whole
            // tunnel on a half-close, losing echoes still on their way.
            if let Ok(all) = permits.acquire_many(window as u32).await {
                all.forget();
            }
            writer.shutdown().await
        })
    };
    let template = ws::frame(size, 0);
    let mut buffer = vec![0u8; template.len()];
    let mut sequence = 0u64;
    loop {
        match reader.read_exact(&mut buffer).await {
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(error) => return Err(error),
        }
        let header = template.len() - size;
        let stamp_end = header + size.min(8);
        let expected_stamp = &sequence.to_le_bytes()[..size.min(8)];
        if buffer[..header] != template[..header]
            || &buffer[header..stamp_end] != expected_stamp
            || buffer[stamp_end..] != template[stamp_end..]
        {
            return Err(io::Error::other(format!(
                "message {sequence} came back changed"
            )));
        }
        sequence += 1;
        counters.completed.fetch_add(1, Ordering::Relaxed);
        counters.bytes.fetch_add(size as u64, Ordering::Relaxed);
        permits.add_permits(1);
    }
    writer_task.await.map_err(io::Error::other)??;
    let sent = sent.load(Ordering::Acquire);
    if sequence != sent {
        return Err(io::Error::other(format!(
            "sent {sent} messages, {sequence} came back"
        )));
    }
    Ok(())
}

/// Handshakes per second: `concurrency` loops of connect, upgrade, one 16-byte echo, close.
pub async fn handshakes(targets: &[Endpoint], concurrency: usize, duration: Duration) -> Outcome {
    let counters = Counters::new();
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for index in 0..concurrency {
        let targets = targets.to_vec();
        let counters = Arc::clone(&counters);
        tasks.push(tokio::spawn(async move {
            let mut round = index;
            while Instant::now() < deadline {
                let target = &targets[round % targets.len()];
                round += 1;
                match one_handshake(target).await {
                    Ok(()) => {
                        counters.completed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => counters.fail(format!("handshake: {error}")),
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    counters.outcome(started.elapsed())
}

async fn one_handshake(target: &Endpoint) -> io::Result<()> {
    let mut stream = open(target).await?;
    let message = ws::frame(16, 7);
    stream.write_all(&message).await?;
    let mut echoed = vec![0u8; message.len()];
    stream.read_exact(&mut echoed).await?;
    if echoed != message {
        return Err(io::Error::other("echo changed"));
    }
    // Wait for the other side's close so the proxy sees a clean end, not a reset.
    close(stream).await;
    Ok(())
}

/// Opens up to `count` WebSockets (`concurrency` handshakes at a time) and keeps them open.
pub async fn open_many(
    targets: &[Endpoint],
    count: usize,
    concurrency: usize,
) -> (Vec<Conn>, u64, Option<String>) {
    // A target that stops taking connections (Apache at its thread count) would make every
    // remaining open wait out its timeout: after this many failures the rest are not tried.
    const GIVE_UP_AFTER: u64 = 400;
    let permits = Arc::new(Semaphore::new(concurrency));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(count);
    for index in 0..count {
        let target = targets[index % targets.len()].clone();
        let (permits, failed) = (Arc::clone(&permits), Arc::clone(&failed));
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.map_err(io::Error::other)?;
            if failed.load(Ordering::Relaxed) >= GIVE_UP_AFTER {
                return Err(io::Error::other(
                    "not tried: the target refused the ones before",
                ));
            }
            let opened = tokio::time::timeout(Duration::from_secs(3), open(&target))
                .await
                .map_err(|_| io::Error::other("upgrade timed out"))
                .and_then(|opened| opened);
            if opened.is_err() {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            opened
        }));
    }
    let mut streams = Vec::with_capacity(count);
    let (mut failures, mut first_failure) = (0, None);
    for task in tasks {
        match task.await.map_err(io::Error::other).and_then(|r| r) {
            Ok(stream) => streams.push(stream),
            Err(error) => {
                failures += 1;
                first_failure.get_or_insert_with(|| error.to_string());
            }
        }
    }
    (streams, failures, first_failure)
}

/// Sends one message on every held WebSocket and checks each echo; returns how many answered.
pub async fn echo_all(streams: Vec<Conn>, concurrency: usize) -> u64 {
    let permits = Arc::new(Semaphore::new(concurrency));
    let answered = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(streams.len());
    for (index, mut stream) in streams.into_iter().enumerate() {
        let (permits, answered) = (Arc::clone(&permits), Arc::clone(&answered));
        tasks.push(tokio::spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            let message = ws::frame(16, index as u64);
            let mut echoed = vec![0u8; message.len()];
            let exchange = async {
                stream.write_all(&message).await?;
                stream.read_exact(&mut echoed).await
            };
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(10), exchange).await
                && echoed == message
            {
                answered.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    answered.load(Ordering::Relaxed)
}

/// Round-trip times at a fixed rate: `connections` WebSockets, each sending a `size`-byte
/// message every `period` (staggered so the load is even), whatever the echoes are doing.
/// Each time runs from just before the message is written to when its echo has been read
/// and checked; returns the outcome and every time in microseconds.
pub async fn latency(
    targets: &[Endpoint],
    connections: usize,
    period: Duration,
    size: usize,
    duration: Duration,
) -> (Outcome, Vec<u32>) {
    let counters = Counters::new();
    let started = Instant::now();
    let deadline = started + duration;
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for index in 0..connections {
        let target = targets[index % targets.len()].clone();
        let (counters, times) = (Arc::clone(&counters), Arc::clone(&times));
        let offset = period * index as u32 / connections as u32;
        tasks.push(tokio::spawn(async move {
            match timed_connection(&target, period, offset, size, deadline, &counters).await {
                Ok(mine) => times.lock().unwrap().extend(mine),
                Err(error) => counters.fail(format!("connection {index}: {error}")),
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let times = std::mem::take(&mut *times.lock().unwrap());
    (counters.outcome(started.elapsed()), times)
}

async fn timed_connection(
    target: &Endpoint,
    period: Duration,
    offset: Duration,
    size: usize,
    deadline: Instant,
    counters: &Counters,
) -> io::Result<Vec<u32>> {
    let stream = open(target).await?;
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (sent_at, mut echoes_due) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let writer_task = tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sequence = 0u64;
        loop {
            ticks.tick().await;
            if Instant::now() >= deadline {
                break;
            }
            let message = ws::frame(size, sequence);
            let _ = sent_at.send(Instant::now());
            writer.write_all(&message).await?;
            sequence += 1;
        }
        // The sender goes with this task: the reader stops after the last echo. Half-close
        // only then (nginx ends a tunnel on a half-close).
        io::Result::Ok(writer)
    });
    let template = ws::frame(size, 0);
    let mut buffer = vec![0u8; template.len()];
    let mut times = Vec::new();
    let mut sequence = 0u64;
    while let Some(sent) = echoes_due.recv().await {
        tokio::time::timeout(Duration::from_secs(5), reader.read_exact(&mut buffer))
            .await
            .map_err(|_| io::Error::other(format!("no echo of message {sequence} in 5 s")))??;
        let elapsed = sent.elapsed();
        if buffer != ws::frame(size, sequence) {
            return Err(io::Error::other(format!(
                "message {sequence} came back changed"
            )));
        }
        times.push(elapsed.as_micros().min(u128::from(u32::MAX)) as u32);
        sequence += 1;
        counters.completed.fetch_add(1, Ordering::Relaxed);
        counters.bytes.fetch_add(size as u64, Ordering::Relaxed);
    }
    let mut writer = writer_task.await.map_err(io::Error::other)??;
    writer.shutdown().await?;
    Ok(times)
}

/// Which member each of `count` WebSockets opened one after another reached (as ports), the
/// sockets kept open.
pub async fn open_in_order(target: &Endpoint, count: usize) -> io::Result<Vec<(Conn, u16)>> {
    let mut opened = Vec::with_capacity(count);
    for _ in 0..count {
        let (stream, member) =
            tokio::time::timeout(Duration::from_secs(3), open_identified(target))
                .await
                .map_err(|_| io::Error::other("upgrade timed out"))??;
        opened.push((stream, member));
    }
    Ok(opened)
}

/// Closes a WebSocket cleanly: half-close, then wait for the other side's close.
pub async fn close(mut stream: Conn) {
    let _ = stream.shutdown().await;
    let mut rest = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut rest)).await;
}
