//! Userspace relay: carries a pair when the kernel cannot (no BPF, `--dataplane userspace`, or a
//! pair that was already closing at hand-over). Half-close is propagated in order: a side's FIN
//! is passed on only after its last byte.

use std::io;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::balancer::Lease;

/// Bytes each direction holds in userspace at most.
pub const RELAY_BUFFER: usize = 64 * 1024;

/// Moves bytes both ways until both sides have sent their FIN (each FIN passed on after the
/// last byte before it); returns the bytes moved client->member and member->client.
pub async fn copy_pair(client: &mut TcpStream, member: &mut TcpStream) -> io::Result<(u64, u64)> {
    tokio::io::copy_bidirectional_with_sizes(client, member, RELAY_BUFFER, RELAY_BUFFER).await
}

/// Carries bytes both ways until both sides have closed, then closes both.
pub async fn carry(
    mut client: TcpStream,
    mut member: TcpStream,
    lease: Lease,
) -> io::Result<(u64, u64)> {
    let result = copy_pair(&mut client, &mut member).await;
    if result.is_err() {
        // One side failed: end the other now instead of leaving it half open.
        let _ = client.shutdown().await;
        let _ = member.shutdown().await;
    }
    drop(lease);
    result
}
