//! Picks the carrier for an established pair and prepares the hand-over: forwards the bytes
//! each side sent along with its handshake, then gives the pair to the sockmap or to the
//! userspace relay. Bytes still queued on a socket, even a partly read skb, are the verdict's:
//! it starts at the socket's copied_seq and trims what userspace already read.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::balancer::Lease;
use crate::config::{DataplaneMode, ServerSettings};
use crate::offload::{Pair, Sockmap};
use crate::relay;
use crate::tls::Stream;

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
        mut client: Stream,
        client_early: Bytes,
        mut member: Stream,
        member_early: Bytes,
        lease: Lease,
    ) {
        let forwarded = tokio::time::timeout(self.handover_timeout, async {
            member.write_all(&client_early).await?;
            client.write_all(&member_early).await
        })
        .await;
        match forwarded {
            Ok(Ok(())) => {}
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
        }
        let outcome = match (client, member) {
            (Stream::Plain(client), Stream::Plain(member)) => {
                let (client, member, lease) = match &self.sockmap {
                    Some(sockmap) => match self.offload(sockmap, client, member, lease) {
                        Ok(()) => return,
                        Err(pair) => pair,
                    },
                    None => (client, member, lease),
                };
                relay::carry(client, member, lease).await
            }
            // A TLS leg: rustls encrypts and decrypts in userspace.
            (client, member) => relay::carry(client, member, lease).await,
        };
        if let Err(error) = outcome {
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
