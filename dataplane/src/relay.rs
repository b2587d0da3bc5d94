//! Userspace relay: carries a pair when the kernel cannot (no BPF, `--dataplane userspace`, a
//! pair that was already closing at hand-over, or a TLS leg without kernel TLS, where rustls
//! encrypts and decrypts here), and a plain pair's first `offload_after` before the sockmap
//! takes it. Half-close is propagated in order: a side's FIN (TLS:
//! close_notify and FIN) is passed on only after its last byte.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use crate::balancer::Lease;

/// How often a tunnel whose member may be marked down checks for it.
pub const EVICTION_CHECK: std::time::Duration = std::time::Duration::from_millis(500);

/// Bytes each direction holds in userspace at most.
pub const RELAY_BUFFER: usize = 64 * 1024;

/// Moves bytes both ways until both sides have sent their FIN (each FIN passed on after the
/// last byte before it); returns the bytes moved client->member and member->client.
pub async fn copy_pair<C, M>(client: &mut C, member: &mut M) -> io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    M: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(client, member, RELAY_BUFFER, RELAY_BUFFER).await
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Pairs relayed to their end since start (in a trial or after it).
    pub pairs: AtomicU64,
    /// Bytes read into userspace by the relay (each is written out once).
    pub relayed_bytes: AtomicU64,
    /// Pairs closed for being idle longer than `idle_timeout`.
    pub idle_closed: AtomicU64,
}

/// A stream whose reads add to the relay's byte counter as they happen and note the time.
struct Counted<'a, S> {
    stream: S,
    relayed: &'a AtomicU64,
    /// Bytes read from this stream.
    read: u64,
    /// Milliseconds from `start` to the pair's latest read.
    activity: &'a AtomicU64,
    start: tokio::time::Instant,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            this.read += read as u64;
            this.relayed.fetch_add(read as u64, Ordering::Relaxed);
            let since_start = this.start.elapsed().as_millis() as u64;
            this.activity.store(since_start, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Carries bytes both ways until both sides have closed, then closes both; a pair with no
/// byte either way for `idle_timeout` is closed.
pub async fn carry<C, M>(
    client: C,
    member: M,
    lease: Lease,
    stats: &RelayStats,
    idle_timeout: Option<std::time::Duration>,
) -> io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin,
    M: AsyncRead + AsyncWrite + Unpin,
{
    stats.pairs.fetch_add(1, Ordering::Relaxed);
    let relayed = &stats.relayed_bytes;
    let (activity, start) = (AtomicU64::new(0), tokio::time::Instant::now());
    let mut client = Counted {
        stream: client,
        relayed,
        read: 0,
        activity: &activity,
        start,
    };
    let mut member = Counted {
        stream: member,
        relayed,
        read: 0,
        activity: &activity,
        start,
    };
    let copied = copy_pair(&mut client, &mut member);
    let idle = async {
        let Some(limit) = idle_timeout else {
            return std::future::pending().await;
        };
        loop {
            let last = start + std::time::Duration::from_millis(activity.load(Ordering::Relaxed));
            if last.elapsed() >= limit {
                return limit;
            }
            tokio::time::sleep_until(last + limit).await;
        }
    };
    let result = tokio::select! {
        result = copied => result,
        limit = idle => {
            stats.idle_closed.fetch_add(1, Ordering::Relaxed);
            Err(io::Error::new(io::ErrorKind::TimedOut, format!("idle for {limit:?}")))
        }
        () = marked_down(&lease) => Err(io::Error::other("its member was marked down")),
    };
    if result.is_err() {
        // One side failed: end the other now instead of leaving it half open.
        let _ = client.shutdown().await;
        let _ = member.shutdown().await;
    }
    lease.record_traffic(client.read + member.read);
    drop(lease);
    result
}

/// Resolves once the tunnel's member is marked down with `shutdown_sessions` (never where
/// nobody evicts).
async fn marked_down(lease: &Lease) {
    if !lease.evictable() {
        return std::future::pending().await;
    }
    while !lease.evicted() {
        tokio::time::sleep(EVICTION_CHECK).await;
    }
}

/// Bytes one direction reads at once while a pair is on trial.
const TRIAL_CHUNK: usize = 16 * 1024;

/// How one direction of a trial ended.
enum TrialEnd {
    /// `offload_after` passed between two reads: nothing read is left unwritten.
    Lived,
    /// The other direction failed: stopped between two reads the same way.
    Stopped,
    /// Its source sent its FIN, passed on after its last byte.
    Ended,
    /// A read or a write failed (a reset): the pair is closed, as the relay would.
    Failed,
}

/// Relays a pair in userspace for its first `offload_after`: a WebSocket that lives that long
/// with both sides open comes back for the kernel, with no byte left in userspace; one that
/// closes sooner (a reconnect storm, a health check) is carried to its end here and never
/// costs a sockmap set-up. A pair holds a buffer only while its destination is behind.
pub async fn carry_on_trial(
    mut client: TcpStream,
    mut member: TcpStream,
    lease: Lease,
    stats: &RelayStats,
    idle_timeout: Option<std::time::Duration>,
    offload_after: std::time::Duration,
) -> Option<(TcpStream, TcpStream, Lease)> {
    let until = tokio::time::Instant::now() + offload_after;
    let ends = Ends::default();
    let trial = {
        let (mut client_read, mut client_write) = client.split();
        let (mut member_read, mut member_write) = member.split();
        let both_ways = async {
            tokio::join!(
                trial_direction(&mut client_read, &mut member_write, until, &ends, stats),
                trial_direction(&mut member_read, &mut client_write, until, &ends, stats),
            )
        };
        tokio::select! {
            ends = both_ways => Some(ends),
            () = marked_down(&lease) => None,
        }
    };
    let closing = match trial {
        None => Some("its member was marked down"),
        Some(((up_end, up), (down_end, down))) => {
            lease.record_traffic(up + down);
            match (up_end, down_end) {
                (TrialEnd::Lived, TrialEnd::Lived) => return Some((client, member, lease)),
                (TrialEnd::Failed, _) | (_, TrialEnd::Failed) => Some("a read or write failed"),
                // Both FINs read; closing both passes the second on.
                (TrialEnd::Ended, TrialEnd::Ended) => {
                    stats.pairs.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                // Half closed when the trial ended: the relay carries the open direction (the
                // ended one reads its FIN again; passing it twice is a no-op).
                _ => None,
            }
        }
    };
    if let Some(why) = closing {
        stats.pairs.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("relayed pair ended: {why}");
        let _ = client.shutdown().await;
        let _ = member.shutdown().await;
        return None;
    }
    if let Err(error) = carry(client, member, lease, stats, idle_timeout).await {
        tracing::debug!("relayed pair ended with {error}");
    }
    None
}

thread_local! {
    /// Where a trial direction reads: bytes the destination takes at once never need a buffer
    /// of the pair's own, so a pair on trial holds none unless its destination is behind.
    static TRIAL_SCRATCH: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(vec![0; TRIAL_CHUNK]);
}

/// Reads what `source` holds. A short read emptied the socket, so its readiness is cleared
/// then: the next wait goes to epoll instead of to a read that would find nothing. (A byte
/// arriving after the read is a new edge for epoll, so nothing is missed.)
fn read_draining(source: &ReadHalf<'_>, buffer: &mut [u8]) -> io::Result<usize> {
    let capacity = buffer.len();
    let mut read = None;
    let outcome = source.as_ref().try_io(tokio::io::Interest::READABLE, || {
        let bytes = source.try_read(buffer)?;
        read = Some(bytes);
        if bytes > 0 && bytes < capacity {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(bytes)
    });
    match read {
        Some(bytes) => Ok(bytes),
        None => outcome,
    }
}

/// What one read of a trial direction got.
enum TrialRead {
    /// Bytes read, and what the destination did not take at once.
    Moved(usize, Vec<u8>),
    Nothing,
    End(TrialEnd),
}

/// What the two directions of a trial tell each other. Both run on the pair's one task.
#[derive(Default)]
struct Ends {
    /// Set by a direction that failed; the other stops.
    failed: AtomicBool,
    /// Set by the first direction to read its FIN.
    one_ended: AtomicBool,
}

impl Ends {
    /// Tells the other direction to stop: it is polled again when the pair's task wakes.
    async fn fail(&self) {
        self.failed.store(true, Ordering::Relaxed);
        std::future::poll_fn(|context| {
            context.waker().wake_by_ref();
            Poll::Ready(())
        })
        .await;
    }

    /// Ready once the other direction has failed. It registers no waker: `fail` wakes the
    /// task, and `tokio::join!` polls every unfinished direction each time the task runs.
    async fn other_failed(&self) {
        std::future::poll_fn(|_| {
            if self.failed.load(Ordering::Relaxed) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }
}

/// One direction of a trial; returns how it ended and the bytes it moved.
async fn trial_direction(
    source: &mut ReadHalf<'_>,
    destination: &mut WriteHalf<'_>,
    until: tokio::time::Instant,
    ends: &Ends,
    stats: &RelayStats,
) -> (TrialEnd, u64) {
    // One timer for the whole trial, not one per wait.
    let lived = tokio::time::sleep_until(until);
    tokio::pin!(lived);
    let mut moved = 0;
    let end = loop {
        tokio::select! {
            biased;
            () = ends.other_failed() => return (TrialEnd::Stopped, moved),
            () = &mut lived => return (TrialEnd::Lived, moved),
            ready = source.readable() => if ready.is_err() {
                break TrialEnd::Failed;
            },
        }
        let read = TRIAL_SCRATCH.with_borrow_mut(|scratch| match read_draining(source, scratch) {
            Ok(0) => TrialRead::End(TrialEnd::Ended),
            Ok(read) => match destination.try_write(&scratch[..read]) {
                Ok(written) => TrialRead::Moved(read, scratch[written..read].to_vec()),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    TrialRead::Moved(read, scratch[..read].to_vec())
                }
                Err(_) => TrialRead::End(TrialEnd::Failed),
            },
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => TrialRead::Nothing,
            Err(_) => TrialRead::End(TrialEnd::Failed),
        });
        match read {
            TrialRead::Nothing => continue,
            // Every byte before the FIN is written: pass it on now, or, when this is the
            // second FIN, by closing both sockets (no unread byte is left on either).
            TrialRead::End(TrialEnd::Ended) => {
                if ends.one_ended.swap(true, Ordering::Relaxed) {
                    return (TrialEnd::Ended, moved);
                }
                match destination.shutdown().await {
                    Ok(()) => return (TrialEnd::Ended, moved),
                    Err(_) => break TrialEnd::Failed,
                }
            }
            TrialRead::End(end) => break end,
            TrialRead::Moved(read, rest) => {
                stats
                    .relayed_bytes
                    .fetch_add(read as u64, Ordering::Relaxed);
                if !rest.is_empty() && destination.write_all(&rest).await.is_err() {
                    break TrialEnd::Failed;
                }
                moved += read as u64;
            }
        }
    };
    ends.fail().await;
    (end, moved)
}
