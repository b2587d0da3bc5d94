//! Picks the carrier for an established pair and prepares the hand-over: forwards the bytes
//! each side sent along with its handshake, drains both sockets (the verdict would redirect a
//! partly read skb whole, duplicating its first bytes), bounds kernel buffering, and gives the
//! pair to the sockmap or to the userspace relay.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::balancer::Lease;
use crate::config::{DataplaneMode, ServerSettings};
use crate::offload::{Pair, Sockmap};
use crate::relay;

/// How a ws:// pair is carried once established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    Sockmap,
    Userspace,
}

impl Carrier {
    pub fn name(self) -> &'static str {
        match self {
            Carrier::Sockmap => "sockmap",
            Carrier::Userspace => "userspace",
        }
    }
}

/// The data plane shared by every worker.
#[derive(Debug)]
pub struct Dataplane {
    sockmap: Option<Sockmap>,
    max_buffered: u64,
    handover_timeout: Duration,
    /// The start-up line naming what carries each kind of pair.
    pub announcement: String,
}

/// Rounds of draining before a pair that never goes quiet is relayed in userspace instead.
const DRAIN_ROUNDS: usize = 64;

impl Dataplane {
    /// Loads the kernel path per `settings.dataplane`; `auto` falls back with a reason.
    pub fn start(settings: &ServerSettings, max_pairs: u32) -> Result<Dataplane, String> {
        let (sockmap, announcement) = match settings.dataplane {
            DataplaneMode::Userspace => (
                None,
                "dataplane: ws<->ws pairs: userspace relay (--dataplane userspace)".to_string(),
            ),
            DataplaneMode::Sockmap => {
                let sockmap = Sockmap::load(max_pairs)
                    .map_err(|reason| format!("--dataplane sockmap: {reason}"))?;
                (
                    Some(sockmap),
                    "dataplane: ws<->ws pairs: BPF sockmap redirection".to_string(),
                )
            }
            DataplaneMode::Auto => match Sockmap::load(max_pairs) {
                Ok(sockmap) => (
                    Some(sockmap),
                    "dataplane: ws<->ws pairs: BPF sockmap redirection".to_string(),
                ),
                Err(reason) => (
                    None,
                    format!("dataplane: ws<->ws pairs: userspace relay, because {reason}"),
                ),
            },
        };
        Ok(Dataplane {
            sockmap,
            max_buffered: settings.max_buffered_per_direction,
            handover_timeout: settings.handshake_timeout,
            announcement,
        })
    }

    pub fn carrier(&self) -> Carrier {
        if self.sockmap.is_some() {
            Carrier::Sockmap
        } else {
            Carrier::Userspace
        }
    }

    pub fn sockmap(&self) -> Option<&Sockmap> {
        self.sockmap.as_ref()
    }

    /// Carries an upgraded pair until both sides have closed.
    pub async fn carry(
        self: Arc<Self>,
        mut client: TcpStream,
        client_early: Bytes,
        mut member: TcpStream,
        member_early: Bytes,
        mut lease: Lease,
    ) {
        let _ = (client.set_nodelay(true), member.set_nodelay(true));
        let prepared = tokio::time::timeout(self.handover_timeout, async {
            member.write_all(&client_early).await?;
            client.write_all(&member_early).await?;
            if self.sockmap.is_some() {
                drain_both(&mut client, &mut member).await
            } else {
                Ok(false)
            }
        })
        .await;
        let quiet = match prepared {
            Ok(Ok(quiet)) => quiet,
            Ok(Err(error)) => {
                tracing::debug!("pair closed during hand-over: {error}");
                return;
            }
            Err(_) => {
                tracing::info!(
                    "pair closed: hand-over did not finish within {:?}",
                    self.handover_timeout
                );
                return;
            }
        };
        if let (Some(sockmap), true) = (&self.sockmap, quiet) {
            match self.offload(sockmap, client, member, lease) {
                Ok(()) => return,
                Err((c, m, l)) => (client, member, lease) = (c, m, l),
            }
        }
        if let Err(error) = relay::carry(client, member, lease).await {
            tracing::debug!("relayed pair ended with {error}");
        }
    }

    fn offload(
        &self,
        sockmap: &Sockmap,
        client: TcpStream,
        member: TcpStream,
        lease: Lease,
    ) -> Result<(), (TcpStream, TcpStream, Lease)> {
        let (client, member) = match (client.into_std(), member.into_std()) {
            (Ok(client), Ok(member)) => (client, member),
            _ => {
                tracing::warn!("cannot take the sockets out of the reactor; pair closed");
                return Ok(());
            }
        };
        let pair = Pair {
            client,
            member,
            lease,
            redirect_limit: self.max_buffered / 2,
        };
        sockmap.offload(pair).or_else(|pair| {
            match (
                TcpStream::from_std(pair.client),
                TcpStream::from_std(pair.member),
            ) {
                (Ok(client), Ok(member)) => Err((client, member, pair.lease)),
                _ => {
                    tracing::warn!("cannot return the sockets to the reactor; pair closed");
                    Ok(())
                }
            }
        })
    }
}

/// Reads each side until the kernel has nothing more and forwards it, until a round finds both
/// quiet. Returns false when the pair never went quiet (it is relayed in userspace then).
async fn drain_both(client: &mut TcpStream, member: &mut TcpStream) -> io::Result<bool> {
    let mut buffer = vec![0u8; relay::RELAY_BUFFER];
    for _ in 0..DRAIN_ROUNDS {
        let from_client = drain_into(client, member, &mut buffer).await?;
        let from_member = drain_into(member, client, &mut buffer).await?;
        if from_client == 0 && from_member == 0 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Moves what `source` has queued to `dest`; stops at the first would-block or at EOF (a
/// closing side cannot join the sockhash; its peer and the carrier handle the FIN).
async fn drain_into(
    source: &mut TcpStream,
    dest: &mut TcpStream,
    buffer: &mut [u8],
) -> io::Result<u64> {
    let mut moved = 0;
    loop {
        match source.try_read(buffer) {
            Ok(0) => return Ok(moved),
            Ok(count) => {
                dest.write_all(&buffer[..count]).await?;
                moved += count as u64;
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(moved),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        }
    }
}
