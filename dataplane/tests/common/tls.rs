//! TLS for the tests: throwaway CAs and certificates (rcgen), and a blocking TLS client
//! (rustls) whose two halves run on two threads like the plain client's.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use super::{Connection, Dial, WriteHalf};

/// A directory of PEM files for one test, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Scratch {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "wsplice-tls-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A certificate authority for tests.
pub struct Ca {
    certificate: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let certificate = params.self_signed(&key).unwrap();
        Ca { certificate, key }
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.certificate.der().clone()
    }

    pub fn write_pem(&self, path: &Path) {
        std::fs::write(path, self.certificate.pem()).unwrap();
    }

    /// A leaf for `names`; writes `<stem>.pem` (leaf then CA: a full chain) and `<stem>.key`.
    /// Returns the two paths and the leaf's DER.
    pub fn issue(
        &self,
        scratch: &Scratch,
        stem: &str,
        names: &[&str],
    ) -> (PathBuf, PathBuf, CertificateDer<'static>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let leaf = params
            .signed_by(&key, &self.certificate, &self.key)
            .unwrap();
        let (cert, key_path) = (
            scratch.path(&format!("{stem}.pem")),
            scratch.path(&format!("{stem}.key")),
        );
        std::fs::write(&cert, format!("{}{}", leaf.pem(), self.certificate.pem())).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert, key_path, leaf.der().clone())
    }
}

/// A client configuration trusting `cas`, TLS 1.2 and 1.3, ALPN http/1.1, every handshake a
/// full one (a resumed session would show the certificate it began with).
pub fn client_config(cas: &[&Ca]) -> Arc<ClientConfig> {
    client_config_offering(cas, rustls::DEFAULT_VERSIONS, None)
}

/// `client_config`, offering only `versions` and, when given, one cipher suite.
pub fn client_config_offering(
    cas: &[&Ca],
    versions: &[&'static rustls::SupportedProtocolVersion],
    suite: Option<rustls::SupportedCipherSuite>,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca.der()).unwrap();
    }
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(suite) = suite {
        provider.cipher_suites = vec![suite];
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// The connection's TLS state, shared by the halves. Records leave in the order they were
/// made: a half takes `sending` before letting go of `tls`.
struct Shared {
    tls: Mutex<ClientConnection>,
    sending: Mutex<TcpStream>,
    receiving: Mutex<TcpStream>,
}

impl Shared {
    /// Sends whatever TLS records are pending; called with the `tls` lock held, which it
    /// releases once the records are queued for the socket in order.
    fn flush(&self, mut tls: std::sync::MutexGuard<'_, ClientConnection>) -> io::Result<()> {
        let mut records = Vec::new();
        while tls.wants_write() {
            tls.write_tls(&mut records)?;
        }
        if records.is_empty() {
            return Ok(());
        }
        let mut socket = self.sending.lock().unwrap();
        drop(tls);
        socket.write_all(&records)
    }
}

struct TlsReader {
    shared: Arc<Shared>,
    /// Ciphertext read from the socket and not yet taken by rustls (its buffer is bounded).
    pending: Vec<u8>,
    eof: bool,
}

struct TlsWriter(Arc<Shared>);

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut tls = self.shared.tls.lock().unwrap();
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n), // 0: the server's close_notify
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
            if !self.pending.is_empty() || self.eof {
                let mut slice = &self.pending[..];
                let taken = tls.read_tls(&mut slice)?;
                self.pending.drain(..taken);
                tls.process_new_packets()
                    .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
                if self.eof && self.pending.is_empty() {
                    return match tls.reader().read(buf) {
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                            Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "EOF without close_notify",
                            ))
                        }
                        other => other,
                    };
                }
                self.shared.flush(tls)?;
                continue;
            }
            drop(tls);
            let mut incoming = [0u8; 16 * 1024];
            let n = self.shared.receiving.lock().unwrap().read(&mut incoming)?;
            self.eof = n == 0;
            self.pending.extend_from_slice(&incoming[..n]);
        }
    }
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut tls = self.0.tls.lock().unwrap();
        let n = tls.writer().write(buf)?;
        self.0.flush(tls)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl WriteHalf for TlsWriter {
    fn shutdown_write(&mut self) -> io::Result<()> {
        let mut tls = self.0.tls.lock().unwrap();
        tls.send_close_notify();
        self.0.flush(tls)?;
        self.0.sending.lock().unwrap().shutdown(Shutdown::Write)
    }
}

/// A TLS client connection after its handshake.
pub struct TlsClient {
    pub connection: Connection,
    /// The server's leaf certificate.
    pub leaf: CertificateDer<'static>,
    /// The TCP socket underneath, for TCP_INFO.
    pub socket: TcpStream,
}

/// Connects with TLS, finishing the handshake before returning.
pub fn connect_tls(
    address: SocketAddr,
    config: &Arc<ClientConfig>,
    server_name: &str,
) -> io::Result<TlsClient> {
    let mut socket = TcpStream::connect(address)?;
    socket.set_nodelay(true)?;
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    let mut tls = ClientConnection::new(Arc::clone(config), name)
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    while tls.is_handshaking() {
        tls.complete_io(&mut socket)?;
    }
    let leaf = tls
        .peer_certificates()
        .and_then(|chain| chain.first())
        .cloned()
        .ok_or_else(|| io::Error::other("no server certificate"))?;
    let shared = Arc::new(Shared {
        tls: Mutex::new(tls),
        sending: Mutex::new(socket.try_clone()?),
        receiving: Mutex::new(socket.try_clone()?),
    });
    let connection = Connection {
        reader: Box::new(TlsReader {
            shared: Arc::clone(&shared),
            pending: Vec::new(),
            eof: false,
        }),
        writer: Box::new(TlsWriter(shared)),
    };
    Ok(TlsClient {
        connection,
        leaf,
        socket,
    })
}

/// Dials the proxy with TLS, naming `server_name` by SNI.
pub fn tls_dial(config: Arc<ClientConfig>, server_name: &'static str) -> Dial {
    Arc::new(move |proxy| connect_tls(proxy, &config, server_name).map(|c| c.connection))
}

/// A client that finishes its handshake and writes `request` at once (in the same flight under
/// TLS 1.3), over a blocking socket; returns the rustls stream for reading the answer.
pub fn client_with_early_request(
    address: SocketAddr,
    config: Arc<ClientConfig>,
    request: &[u8],
) -> rustls::StreamOwned<ClientConnection, TcpStream> {
    let socket = TcpStream::connect(address).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let connection = ClientConnection::new(config, name).unwrap();
    let mut stream = rustls::StreamOwned::new(connection, socket);
    stream.write_all(request).unwrap();
    stream.flush().unwrap();
    stream
}

/// The server's side of [`client_with_early_request`]: accepts one connection and does the
/// whole-record handshake (which fails if rustls was given records past it); the request must
/// still be in the kernel.
pub fn accept_whole_record_handshake(
    listener: std::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> (rustls::server::UnbufferedServerConnection, TcpStream) {
    let (socket, _) = listener.accept().unwrap();
    socket.set_nonblocking(true).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (connection, socket) = runtime.block_on(async {
        let mut socket = tokio::net::TcpStream::from_std(socket).unwrap();
        let connection = wsplice::tls::handshake_whole_records(config, &mut socket)
            .await
            .unwrap();
        (connection, socket.into_std().unwrap())
    });
    socket.set_nonblocking(false).unwrap();
    assert!(
        super::wait_until(std::time::Duration::from_secs(5), || {
            wsplice::sys::unread_receive_queue(std::os::fd::AsFd::as_fd(&socket)).unwrap_or(0) > 0
        }),
        "the request never reached the server's socket"
    );
    (connection, socket)
}
