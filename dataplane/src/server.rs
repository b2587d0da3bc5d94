//! Listeners and workers: each worker thread runs its own single-threaded runtime with its own
//! SO_REUSEPORT listener per address, so the kernel spreads accepts across workers.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::watch;

use crate::config::{Config, DataplaneMode, ServerSettings};
use crate::dataplane::{Carrier, Dataplane};
use crate::http::{self, Entry};
use crate::router::Router;
use crate::tls::{CertificateStore, Reload, ServerTls, Stream};

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub accepted: AtomicU64,
    pub upgrades: AtomicU64,
    pub rejected_upgrades: AtomicU64,
    pub tls_failures: AtomicU64,
}

/// What every connection's session can reach.
#[derive(Debug)]
pub struct Shared {
    pub settings: ServerSettings,
    pub router: Arc<Router>,
    pub dataplane: Arc<Dataplane>,
    pub stats: ServerStats,
}

/// A running server.
pub struct ServerHandle {
    /// The bound addresses, in config order (ports resolved when 0 was asked for).
    pub addresses: Vec<SocketAddr>,
    pub shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
}

impl ServerHandle {
    /// Stops accepting and waits for the workers; established tunnels stay with the carrier.
    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }

    /// Blocks until the workers end (they end only when stopped).
    pub fn wait(mut self) {
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: io::Error,
    },
    #[error("{0}")]
    Dataplane(String),
    #[error("cannot start a worker: {0}")]
    Worker(io::Error),
    #[error("{0}")]
    Tls(String),
}

fn reuseport_listener(
    address: SocketAddr,
    buffers: (usize, usize),
) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    // Accepted sockets inherit these from the start of their window.
    socket.set_recv_buffer_size(buffers.0)?;
    socket.set_send_buffer_size(buffers.1)?;
    // Inherited by accepted sockets too: one setsockopt per listener, not per connection.
    socket.set_tcp_nodelay(true)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&address.into())?;
    socket.listen(4096)?;
    // Accepted sockets start with delayed ACKs, so the ACK of a request (or of a TLS
    // ClientHello) goes out with the answer rather than as a packet of its own.
    socket.set_tcp_quickack(false)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Starts listeners, workers and the data plane.
pub fn start(config: Config) -> Result<ServerHandle, StartError> {
    let settings = config.server.clone();
    let max_pairs = (crate::sys::open_files_limit() / 2).clamp(64, 1 << 22) as u32;
    let kernel_tls = if !config.listeners.iter().any(|l| l.tls.is_some()) {
        Err("no listener has TLS".to_string())
    } else if !settings.kernel_tls {
        Err("kernel_tls is off in [server]".to_string())
    } else {
        crate::tls::kernel_tls_works()
    };
    let dataplane =
        Dataplane::start(&settings, max_pairs, &kernel_tls).map_err(StartError::Dataplane)?;
    if settings.dataplane == DataplaneMode::Auto && dataplane.carrier() == Carrier::Userspace {
        tracing::warn!("{}", dataplane.announcement); // a fallback: say why, once
    } else {
        tracing::info!("{}", dataplane.announcement);
    }

    // Bind every worker's listeners here so a bad address fails start-up, not a thread.
    let mut addresses = Vec::new();
    let mut per_worker: Vec<Vec<Listening>> = (0..settings.workers).map(|_| Vec::new()).collect();
    let mut certificate_stores = Vec::new();
    for listener in &config.listeners {
        let tls = match &listener.tls {
            Some(tls) => {
                let tls = ServerTls::new(tls)
                    .map_err(|error| StartError::Tls(format!("{}: {error}", listener.address)))?;
                certificate_stores.push(Arc::clone(&tls.store));
                Some(TlsEntry {
                    acceptor: tokio_rustls::TlsAcceptor::from(tls.config),
                    kernel: kernel_tls.is_ok(),
                })
            }
            None => None,
        };
        let entry = Entry {
            tls: tls.is_some(),
            redirect_to_https: listener.redirect_to_https,
        };
        let mut address = listener.address;
        for worker in &mut per_worker {
            let bound = reuseport_listener(address, settings.socket_buffers())
                .map_err(|source| StartError::Listen { address, source })?;
            address = bound
                .local_addr()
                .map_err(|source| StartError::Listen { address, source })?;
            worker.push(Listening {
                listener: bound,
                tls: tls.clone(),
                entry,
            });
        }
        let kind = match (&tls, listener.redirect_to_https) {
            (Some(_), _) => "wss:// and https://",
            (None, true) => "redirecting to https://",
            (None, false) => "ws:// and http://",
        };
        tracing::info!(
            "listening on {address}, {kind} ({} workers)",
            settings.workers
        );
        addresses.push(address);
    }
    let router = Router::new(&config).map_err(StartError::Tls)?;
    let any_tls = !certificate_stores.is_empty()
        || config
            .clusters
            .iter()
            .any(|cluster| cluster.members.iter().any(|member| member.tls));
    if any_tls {
        tracing::info!("{}", dataplane.tls_announcement);
    }
    let (stop, stopped) = watch::channel(false);
    spawn_certificate_reloader(certificate_stores, stopped.clone()).map_err(StartError::Worker)?;

    let router = Arc::new(router);
    crate::health::spawn(Arc::clone(&router), stopped.clone()).map_err(StartError::Worker)?;
    let shared = Arc::new(Shared {
        router,
        dataplane: Arc::new(dataplane),
        settings,
        stats: ServerStats::default(),
    });
    let mut workers = Vec::new();
    for (index, listeners) in per_worker.into_iter().enumerate() {
        let shared = Arc::clone(&shared);
        let stopped = stopped.clone();
        let worker = std::thread::Builder::new()
            .name(format!("wsplice-worker-{index}"))
            .spawn(move || run_worker(listeners, shared, stopped))
            .map_err(StartError::Worker)?;
        workers.push(worker);
    }
    Ok(ServerHandle {
        addresses,
        shared,
        stop,
        workers,
    })
}

/// One worker's socket for one listener, and what the listener asks of its connections.
struct Listening {
    listener: std::net::TcpListener,
    tls: Option<TlsEntry>,
    entry: Entry,
}

/// A TLS listener's acceptor, and whether its connections go to kernel TLS after the
/// handshake.
#[derive(Clone)]
struct TlsEntry {
    acceptor: tokio_rustls::TlsAcceptor,
    kernel: bool,
}

fn run_worker(listeners: Vec<Listening>, shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!("worker runtime: {error}");
            return;
        }
    };
    runtime.block_on(async move {
        for listening in listeners {
            let listener = match tokio::net::TcpListener::from_std(listening.listener) {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::error!("worker listener: {error}");
                    continue;
                }
            };
            tokio::spawn(accept_loop(
                listener,
                listening.tls,
                listening.entry,
                Arc::clone(&shared),
            ));
        }
        let _ = stopped.wait_for(|stop| *stop).await;
    });
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Option<TlsEntry>,
    entry: Entry,
    shared: Arc<Shared>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, client)) => {
                shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
                let shared = Arc::clone(&shared);
                let Some(TlsEntry { acceptor, kernel }) = tls.clone() else {
                    tokio::spawn(http::serve(Stream::Plain(stream), client, shared, entry));
                    continue;
                };
                tokio::spawn(async move {
                    let timeout = shared.settings.handshake_timeout;
                    // The tls ULP joins only an established socket: attached now, it passes
                    // bytes through untouched until the keys are set after the handshake.
                    let kernel_tls = kernel
                        && crate::sys::ktls_attach(std::os::fd::AsFd::as_fd(&stream)).is_ok();
                    let handshake = async {
                        if kernel_tls {
                            let mut stream = stream;
                            let connection = crate::tls::handshake_whole_records(
                                Arc::clone(acceptor.config()),
                                &mut stream,
                            )
                            .await?;
                            crate::tls::KtlsStream::install(connection, stream).map(Stream::Ktls)
                        } else {
                            let stream = acceptor.accept(stream).await?;
                            Ok(Stream::Tls(Box::new(stream.into())))
                        }
                    };
                    match tokio::time::timeout(timeout, handshake).await {
                        Ok(Ok(stream)) => {
                            http::serve(stream, client, shared, entry).await;
                        }
                        Ok(Err(error)) => {
                            shared.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::info!("client {client}: TLS handshake failed: {error}");
                        }
                        Err(_) => {
                            shared.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(
                                "client {client}: TLS handshake not done within {timeout:?}"
                            );
                        }
                    }
                });
            }
            Err(error) => {
                // Out of descriptors or memory: back off instead of spinning.
                tracing::warn!("accept: {error}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// How often certificate files are looked at for a renewal.
const CERTIFICATE_CHECK: Duration = Duration::from_secs(2);

/// Reloads listener certificates when their files change and on SIGHUP (which otherwise
/// would end the process), on a thread of its own. A certificate that fails to load keeps
/// the old one, and the log says why.
fn spawn_certificate_reloader(
    stores: Vec<Arc<CertificateStore>>,
    mut stopped: watch::Receiver<bool>,
) -> io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Installed here, before start() returns, so an early SIGHUP is caught too.
    let mut hangups = runtime.block_on(async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    })?;
    std::thread::Builder::new()
        .name("wsplice-reload".into())
        .spawn(move || {
            runtime.block_on(async move {
                let mut ticks = tokio::time::interval(CERTIFICATE_CHECK);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    let forced = tokio::select! {
                        _ = stopped.wait_for(|stop| *stop) => return,
                        _ = ticks.tick() => false,
                        received = hangups.recv() => {
                            if received.is_none() {
                                return;
                            }
                            tracing::info!("SIGHUP: reloading {} certificate set(s)", stores.len());
                            true
                        }
                    };
                    for store in &stores {
                        match store.reload(forced) {
                            Reload::Unchanged => {}
                            Reload::Loaded(count) => {
                                tracing::info!("TLS: {count} certificate(s) reloaded")
                            }
                            Reload::Kept(reason) => {
                                tracing::warn!("TLS: keeping the previous certificates: {reason}")
                            }
                        }
                    }
                }
            });
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TCP_NODELAY and delayed ACKs are set on the listener only: every accepted socket must
    /// have inherited them.
    #[test]
    fn accepted_sockets_inherit_nodelay_and_delayed_acks_from_the_listener() {
        let listener =
            reuseport_listener(SocketAddr::from(([127, 0, 0, 1], 0)), (65536, 65536)).unwrap();
        listener.set_nonblocking(false).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
        assert!(!socket2::SockRef::from(&accepted).tcp_quickack().unwrap());
    }
}
