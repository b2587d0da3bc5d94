//! Userspace relay: carries a pair when the kernel cannot (no BPF, `--dataplane userspace`, a
//! pair that was already closing at hand-over, or a TLS leg without kernel TLS, where rustls
//! encrypts and decrypts here). Half-close is propagated in order: a side's FIN (TLS:
//! close_notify and FIN) is passed on only after its last byte.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

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
    /// Pairs relayed since start.
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
    let evicted = async {
        if !lease.evictable() {
            return std::future::pending().await;
        }
        while !lease.evicted() {
            tokio::time::sleep(EVICTION_CHECK).await;
        }
    };
    let result = tokio::select! {
        result = copied => result,
        limit = idle => {
            stats.idle_closed.fetch_add(1, Ordering::Relaxed);
            Err(io::Error::new(io::ErrorKind::TimedOut, format!("idle for {limit:?}")))
        }
        () = evicted => Err(io::Error::other("its member was marked down")),
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
