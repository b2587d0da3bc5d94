//! Userspace relay: carries a pair when the kernel cannot (no BPF, `--dataplane userspace`, a
//! pair that was already closing at hand-over, or a TLS leg without kernel TLS, where rustls
//! encrypts and decrypts here). Half-close is propagated in order: a side's FIN (TLS:
//! close_notify and FIN) is passed on only after its last byte.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::balancer::Lease;

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

/// Carries bytes both ways until both sides have closed, then closes both.
pub async fn carry<C, M>(mut client: C, mut member: M, lease: Lease) -> io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin,
    M: AsyncRead + AsyncWrite + Unpin,
{
    let result = copy_pair(&mut client, &mut member).await;
    if result.is_err() {
        // One side failed: end the other now instead of leaving it half open.
        let _ = client.shutdown().await;
        let _ = member.shutdown().await;
    }
    drop(lease);
    result
}
