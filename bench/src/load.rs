//! Echo members and the load scenarios. Every echoed message is compared with what was sent.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::ws;

/// Starts a WebSocket echo member on `address`: answers the upgrade, then echoes bytes.
pub async fn start_member(address: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(address).await?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(early) = ws::accept(&mut stream).await else {
                    return;
                };
                if stream.write_all(&early).await.is_err() {
                    return;
                }
                let (mut reader, mut writer) = stream.into_split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
            });
        }
    });
    Ok(())
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

async fn open(target: SocketAddr) -> io::Result<TcpStream> {
    let mut stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    let early = ws::connect(&mut stream, &target.to_string()).await?;
    if !early.is_empty() {
        return Err(io::Error::other("bytes before the first message"));
    }
    Ok(stream)
}

/// Echo throughput: `connections` WebSockets, each keeping `window` messages of `size` bytes in
/// flight, for `duration`. Targets are used round robin (one for a proxy, the members for
/// direct).
pub async fn throughput(
    targets: &[SocketAddr],
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
        let target = targets[index % targets.len()];
        let counters = Arc::clone(&counters);
        tasks.push(tokio::spawn(async move {
            if let Err(error) = echo_connection(target, size, window, deadline, &counters).await {
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
    target: SocketAddr,
    size: usize,
    window: usize,
    deadline: Instant,
    counters: &Counters,
) -> io::Result<()> {
    let stream = open(target).await?;
    let (mut reader, mut writer) = stream.into_split();
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
pub async fn handshakes(targets: &[SocketAddr], concurrency: usize, duration: Duration) -> Outcome {
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
                let target = targets[round % targets.len()];
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

async fn one_handshake(target: SocketAddr) -> io::Result<()> {
    let mut stream = open(target).await?;
    let message = ws::frame(16, 7);
    stream.write_all(&message).await?;
    let mut echoed = vec![0u8; message.len()];
    stream.read_exact(&mut echoed).await?;
    if echoed != message {
        return Err(io::Error::other("echo changed"));
    }
    stream.shutdown().await?;
    // Wait for the other side's close so the proxy sees a clean end, not a reset.
    let mut rest = [0u8; 16];
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut rest)).await;
    Ok(())
}

/// Opens up to `count` WebSockets (`concurrency` handshakes at a time) and keeps them open.
pub async fn open_many(
    targets: &[SocketAddr],
    count: usize,
    concurrency: usize,
) -> (Vec<TcpStream>, u64, Option<String>) {
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = Vec::with_capacity(count);
    for index in 0..count {
        let target = targets[index % targets.len()];
        let permits = Arc::clone(&permits);
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.map_err(io::Error::other)?;
            tokio::time::timeout(Duration::from_secs(3), open(target))
                .await
                .map_err(|_| io::Error::other("upgrade timed out"))?
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
pub async fn echo_all(streams: Vec<TcpStream>, concurrency: usize) -> u64 {
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
