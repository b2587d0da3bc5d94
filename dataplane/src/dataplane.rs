//! Picks the carrier for an established pair and prepares the hand-over: forwards the bytes
//! each side sent along with its handshake, then gives the pair to the sockmap (plain legs),
//! to the splice carrier (a kernel TLS leg) or to the userspace relay. Bytes still queued on a socket, even a partly read skb, are the verdict's:
//! it starts at the socket's copied_seq and trims what userspace already read.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::balancer::Lease;
use crate::config::{DataplaneMode, ServerSettings};
use crate::offload::{Pair, Sockmap};
use crate::relay::{self, RelayStats};
use crate::splice::{Leg, SpliceCarrier, SplicePair};
use crate::tls::Stream;

/// How a ws:// pair is carried once established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    Sockmap,
    Splice,
    Userspace,
}

impl Carrier {
    pub fn name(self) -> &'static str {
        match self {
            Carrier::Sockmap => "sockmap",
            Carrier::Splice => "splice",
            Carrier::Userspace => "userspace",
        }
    }
}

/// The data plane shared by every worker.
#[derive(Debug)]
pub struct Dataplane {
    sockmap: Option<Sockmap>,
    /// Carries pairs with a kernel TLS leg, and ws<->ws pairs in splice mode.
    splice: Option<SpliceCarrier>,
    /// What carries ws<->ws pairs.
    plain_carrier: Carrier,
    /// TLS legs end in kernel TLS and their pairs are spliced.
    kernel_tls_carried: bool,
    pub relay_stats: RelayStats,
    /// Bytes that came with a handshake (after the request, after the 101) and were forwarded
    /// before the carrier took the pair.
    pub handover_bytes: AtomicU64,
    max_buffered: u64,
    handover_timeout: Duration,
    idle_timeout: Option<Duration>,
    /// Sockmap mode relays a pair in userspace this long first (None: offload at once).
    offload_after: Option<Duration>,
    /// The start-up line naming what carries ws<->ws pairs.
    pub announcement: String,
    /// The start-up line naming what carries pairs with a TLS leg.
    pub tls_announcement: String,
}

impl Dataplane {
    /// Loads the kernel path per `settings.dataplane`; `auto` falls back with a reason. With
    /// kernel TLS on the listeners, starts the splice carrier for their pairs.
    pub fn start(
        settings: &ServerSettings,
        max_pairs: u32,
        kernel_tls: &Result<(), String>,
    ) -> Result<Dataplane, String> {
        let mut splice = None;
        let (sockmap, announcement) = match settings.dataplane {
            DataplaneMode::Userspace => (
                None,
                "dataplane: ws<->ws pairs: userspace relay (--dataplane userspace)".to_string(),
            ),
            DataplaneMode::Splice => {
                splice = Some(
                    SpliceCarrier::start(settings.idle_timeout)
                        .map_err(|reason| format!("--dataplane splice: {reason}"))?,
                );
                (
                    None,
                    "dataplane: ws<->ws pairs: splice through pipes driven by io_uring \
                     (--dataplane splice)"
                        .to_string(),
                )
            }
            DataplaneMode::Sockmap => {
                let sockmap = Sockmap::load(max_pairs, settings.idle_timeout)
                    .map_err(|reason| format!("--dataplane sockmap: {reason}"))?;
                (Some(sockmap), sockmap_announcement(settings.offload_after))
            }
            DataplaneMode::Auto => match Sockmap::load(max_pairs, settings.idle_timeout) {
                Ok(sockmap) => (Some(sockmap), sockmap_announcement(settings.offload_after)),
                Err(reason) => (
                    None,
                    format!("dataplane: ws<->ws pairs: userspace relay, because {reason}"),
                ),
            },
        };
        let plain_carrier = if sockmap.is_some() {
            Carrier::Sockmap
        } else if splice.is_some() {
            Carrier::Splice
        } else {
            Carrier::Userspace
        };
        let tls_announcement = match kernel_tls {
            Ok(()) => {
                if splice.is_none() {
                    splice = SpliceCarrier::start(settings.idle_timeout)
                        .map_err(|why| {
                            tracing::warn!("the splice carrier cannot start: {why}");
                        })
                        .ok();
                }
                match &splice {
                    Some(_) => "dataplane: pairs with a TLS leg: kernel TLS (listeners and \
                                wss:// members) + splice through pipes driven by io_uring \
                                (payload stays in the kernel)"
                        .to_string(),
                    None => "dataplane: pairs with a TLS leg: kernel TLS, the relay copies \
                             plaintext (the splice carrier could not start)"
                        .to_string(),
                }
            }
            Err(why) => {
                format!("dataplane: pairs with a TLS leg: rustls relay in userspace, because {why}")
            }
        };
        let kernel_tls_carried = kernel_tls.is_ok() && splice.is_some();
        Ok(Dataplane {
            sockmap,
            splice,
            plain_carrier,
            kernel_tls_carried,
            relay_stats: RelayStats::default(),
            handover_bytes: AtomicU64::new(0),
            tls_announcement,
            max_buffered: settings.max_buffered_per_direction,
            handover_timeout: settings.handshake_timeout,
            idle_timeout: settings.idle_timeout,
            offload_after: settings.offload_after,
            announcement,
        })
    }

    /// What carries ws<->ws pairs.
    pub fn carrier(&self) -> Carrier {
        self.plain_carrier
    }

    pub fn sockmap(&self) -> Option<&Sockmap> {
        self.sockmap.as_ref()
    }

    /// Whether TLS legs end in kernel TLS, their pairs spliced.
    pub fn kernel_tls_carried(&self) -> bool {
        self.kernel_tls_carried
    }

    /// The splice carrier, when kernel TLS and io_uring are both there.
    pub fn splice(&self) -> Option<&SpliceCarrier> {
        self.splice.as_ref()
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
            Ok(Ok(())) => {
                let early = client_early.len() + member_early.len();
                self.handover_bytes
                    .fetch_add(early as u64, Ordering::Relaxed);
            }
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
        // They slice the HTTP stage's read buffers: freed now, not held for the pair's life.
        drop((client_early, member_early));
        let outcome = match (client, member) {
            (Stream::Plain(client), Stream::Plain(member))
                if self.plain_carrier != Carrier::Splice =>
            {
                let (client, member, lease) = match &self.sockmap {
                    Some(sockmap) => {
                        let (client, member, lease) = match self.offload_after {
                            Some(after) => match relay::carry_on_trial(
                                client,
                                member,
                                lease,
                                &self.relay_stats,
                                self.idle_timeout,
                                after,
                            )
                            .await
                            {
                                Some(pair) => pair,
                                None => return, // it ended in userspace
                            },
                            None => (client, member, lease),
                        };
                        match self.offload(sockmap, client, member, lease) {
                            Ok(()) => return,
                            Err(pair) => pair,
                        }
                    }
                    None => (client, member, lease),
                };
                relay::carry(client, member, lease, &self.relay_stats, self.idle_timeout).await
            }
            // Plain (splice mode) or kernel TLS legs: spliced.
            (client, member)
                if self.splice.is_some()
                    && !matches!(client, Stream::Tls(_))
                    && !matches!(member, Stream::Tls(_)) =>
            {
                if let Some(splice) = &self.splice {
                    match (into_leg(client), into_leg(member)) {
                        (Ok(client), Ok(member)) => splice.carry(SplicePair {
                            client,
                            member,
                            lease,
                        }),
                        _ => tracing::warn!(
                            "cannot take the sockets out of the reactor; pair closed"
                        ),
                    }
                }
                return;
            }
            // A rustls leg: rustls encrypts and decrypts in userspace.
            (client, member) => {
                relay::carry(client, member, lease, &self.relay_stats, self.idle_timeout).await
            }
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

/// The start-up line for sockmap mode, with how long a pair is relayed before offload.
fn sockmap_announcement(offload_after: Option<Duration>) -> String {
    match offload_after {
        Some(after) => format!(
            "dataplane: ws<->ws pairs: BPF sockmap redirection, after {after:?} in userspace \
             (offload_after)"
        ),
        None => "dataplane: ws<->ws pairs: BPF sockmap redirection".to_string(),
    }
}

/// A plain or kernel TLS stream as the splice carrier takes it (out of tokio's reactor).
fn into_leg(stream: Stream) -> std::io::Result<Leg> {
    match stream {
        Stream::Plain(socket) => Ok(Leg {
            socket: socket.into_std()?,
            kernel_tls: None,
            ended: false,
        }),
        Stream::Ktls(stream) => {
            let (socket, keys, ended) = stream.into_parts();
            Ok(Leg {
                socket: socket.into_std()?,
                kernel_tls: Some(keys),
                ended,
            })
        }
        Stream::Tls(_) => Err(std::io::Error::other("a rustls stream cannot be spliced")),
    }
}
