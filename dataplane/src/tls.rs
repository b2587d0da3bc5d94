//! The TLS stage: wss:// on listeners (rustls; certificates chosen by SNI and reloaded when
//! their files change or on SIGHUP, a broken new file keeping the old certificate) and wss://
//! to members (rustls client verifying against the system roots or a CA file).
//!
//! TLS 1.2 and 1.3 only, AEAD suites only (all rustls offers), ALPN http/1.1.

use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::crypto::CryptoProvider;
use rustls::kernel::KernelConnection;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{
    ClientHello, ResolvesServerCert, ServerConnectionData, UnbufferedServerConnection,
};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{CertificateFiles, ListenerTls, MemberTlsSettings, UnknownSni};

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain (leaf first) and its private key, and checks they belong
/// together.
pub fn load_certified_key(files: &CertificateFiles) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect())
        .map_err(|error| format!("certificate {}: {error}", files.cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "certificate {}: no CERTIFICATE block",
            files.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|error| format!("key {}: {error}", files.key.display()))?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|error| format!("key {}: {error}", files.key.display()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|error| {
        format!(
            "key {} does not belong to certificate {}: {error}",
            files.key.display(),
            files.cert.display()
        )
    })?;
    Ok(certified)
}

/// What identifies a file's content without reading it: a renewal (certbot swaps the
/// symlink's target) changes at least one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    length: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: metadata.modified().ok(),
        length: metadata.len(),
        inode: metadata.ino(),
    })
}

/// A listener's certificates: the first is the default.
pub struct CertificateStore {
    files: Vec<CertificateFiles>,
    unknown_sni: UnknownSni,
    current: RwLock<Arc<Vec<Arc<CertifiedKey>>>>,
    /// The files' stamps when last read (loaded or not), so a broken file is reported once.
    seen: Mutex<Vec<(Option<Stamp>, Option<Stamp>)>>,
}

impl fmt::Debug for CertificateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateStore")
            .field("files", &self.files)
            .finish()
    }
}

impl CertificateStore {
    pub fn load(tls: &ListenerTls) -> Result<Self, String> {
        let seen = Self::stamps(&tls.certificates);
        let keys = tls
            .certificates
            .iter()
            .map(|files| load_certified_key(files).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CertificateStore {
            files: tls.certificates.clone(),
            unknown_sni: tls.unknown_sni,
            current: RwLock::new(Arc::new(keys)),
            seen: Mutex::new(seen),
        })
    }

    fn stamps(files: &[CertificateFiles]) -> Vec<(Option<Stamp>, Option<Stamp>)> {
        files
            .iter()
            .map(|f| (stamp(&f.cert), stamp(&f.key)))
            .collect()
    }

    /// Reloads every certificate if any file changed since last read (`force`: whatever the
    /// files say). All or nothing: when one fails, every old certificate stays.
    pub fn reload(&self, force: bool) -> Reload {
        let stamps = Self::stamps(&self.files);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if !force && *seen == stamps {
                return Reload::Unchanged;
            }
            *seen = stamps;
        }
        match self
            .files
            .iter()
            .map(|files| load_certified_key(files).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(keys) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
                Reload::Loaded(self.files.len())
            }
            Err(reason) => Reload::Kept(reason),
        }
    }

    fn current(&self) -> Arc<Vec<Arc<CertifiedKey>>> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Loaded(usize),
    /// A file could not be used: the old certificates stay.
    Kept(String),
}

/// Whether `key`'s leaf certificate is valid for `name` (SAN DNS names, wildcards included).
fn serves(key: &CertifiedKey, name: &ServerName<'_>) -> bool {
    key.end_entity_cert()
        .ok()
        .and_then(|leaf| webpki::EndEntityCert::try_from(leaf).ok())
        .is_some_and(|leaf| leaf.verify_is_valid_for_subject_name(name).is_ok())
}

impl ResolvesServerCert for CertificateStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let keys = self.current();
        let Some(sni) = hello.server_name() else {
            // No SNI (clients that dial an IP address): the default certificate.
            return keys.first().cloned();
        };
        if let Ok(name) = ServerName::try_from(sni)
            && let Some(key) = keys.iter().find(|key| serves(key, &name))
        {
            return Some(Arc::clone(key));
        }
        match self.unknown_sni {
            UnknownSni::Default => keys.first().cloned(),
            UnknownSni::Reject => {
                tracing::info!("TLS: no certificate for SNI {sni:?}; handshake refused");
                None
            }
        }
    }
}

/// A TLS listener's rustls configuration and the certificates behind it.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    pub store: Arc<CertificateStore>,
}

impl ServerTls {
    pub fn new(tls: &ListenerTls) -> Result<Self, String> {
        let store = Arc::new(CertificateStore::load(tls)?);
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|error| format!("TLS: {error}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&store) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Kernel TLS takes the keys after the handshake.
        config.enable_secret_extraction = true;
        Ok(ServerTls {
            config: Arc::new(config),
            store,
        })
    }
}

/// Reads every certificate of a CA file into a root store.
pub fn roots_from_file(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path)
        .map_err(|error| format!("CA file {}: {error}", path.display()))?
    {
        let cert = cert.map_err(|error| format!("CA file {}: {error}", path.display()))?;
        roots
            .add(cert)
            .map_err(|error| format!("CA file {}: {error}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("CA file {}: no CERTIFICATE block", path.display()));
    }
    Ok(roots)
}

/// The system's trusted roots (Debian: /etc/ssl/certs); may be empty.
fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        tracing::warn!(
            "TLS: no system root certificates found ({} errors); wss:// members need tls_ca",
            found.errors.len()
        );
    }
    roots
}

/// The rustls client configuration for a cluster's wss:// members.
pub fn client_config(settings: &MemberTlsSettings) -> Result<Arc<ClientConfig>, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|error| format!("TLS: {error}"))?;
    let mut config = if !settings.verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider())))
            .with_no_client_auth()
    } else {
        let roots = match &settings.ca_file {
            Some(path) => roots_from_file(path)?,
            None => system_roots(),
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // For kernel TLS towards members: the traffic secrets go to the kernel.
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// `tls_verify = false`: any member certificate is accepted (the handshake's signatures are
/// still checked, so the session is at least with the holder of that certificate's key).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Kernel TLS parameters for one direction from rustls's extracted secrets: AES-GCM's 12-byte
/// nonce is split into a 4-byte salt and an 8-byte iv, CHACHA20-POLY1305 keeps 12 bytes.
pub fn ktls_direction(
    version: rustls::ProtocolVersion,
    (record_sequence, secrets): (u64, rustls::ConnectionTrafficSecrets),
) -> Result<crate::sys::KtlsDirection, String> {
    use crate::sys;
    use rustls::ConnectionTrafficSecrets as Secrets;
    let version = match version {
        rustls::ProtocolVersion::TLSv1_3 => sys::TLS_1_3_VERSION,
        rustls::ProtocolVersion::TLSv1_2 => sys::TLS_1_2_VERSION,
        other => return Err(format!("kernel TLS does not take {other:?}")),
    };
    let (cipher, key, nonce) = match &secrets {
        Secrets::Aes128Gcm { key, iv } => (sys::TLS_CIPHER_AES_GCM_128, key, iv),
        Secrets::Aes256Gcm { key, iv } => (sys::TLS_CIPHER_AES_GCM_256, key, iv),
        Secrets::Chacha20Poly1305 { key, iv } => (sys::TLS_CIPHER_CHACHA20_POLY1305, key, iv),
        _ => return Err("kernel TLS does not take this cipher suite".into()),
    };
    let nonce = nonce.as_ref();
    let (salt, iv) = if cipher == sys::TLS_CIPHER_CHACHA20_POLY1305 {
        (Vec::new(), nonce.to_vec())
    } else {
        (nonce[..4].to_vec(), nonce[4..].to_vec())
    };
    Ok(sys::KtlsDirection {
        version,
        cipher,
        iv,
        key: key.as_ref().to_vec(),
        salt,
        record_sequence,
    })
}

/// Installs rustls's extracted secrets, both directions, in kernel TLS on `socket` (the tls
/// ULP already attached).
pub fn install_secrets(
    socket: BorrowedFd,
    version: rustls::ProtocolVersion,
    secrets: rustls::ExtractedSecrets,
) -> io::Result<()> {
    let tx = ktls_direction(version, secrets.tx).map_err(io::Error::other)?;
    let rx = ktls_direction(version, secrets.rx).map_err(io::Error::other)?;
    crate::sys::ktls_set(socket, true, &tx)?;
    crate::sys::ktls_set(socket, false, &rx)
}

/// A TLS handshake message type (RFC 8446 B.3).
const KEY_UPDATE: u8 = 24;

/// rustls's key schedule for one connection, server or client side.
enum KeySchedule {
    Server(Box<KernelConnection<ServerConnectionData>>),
    Client(Box<KernelConnection<ClientConnectionData>>),
}

/// What stays of rustls once kernel TLS carries a connection: its key schedule, so the
/// peer's TLS 1.3 key updates can be followed (rustls's `kernel` module), and whether the
/// peer asked for wsplice's own update, which must go out before its next data record.
pub struct KernelKeys {
    schedule: KeySchedule,
    answer_owed: bool,
}

impl fmt::Debug for KernelKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelKeys")
            .field("answer_owed", &self.answer_owed)
            .finish_non_exhaustive()
    }
}

impl KernelKeys {
    fn next_secret(&mut self, transmit: bool) -> Result<crate::sys::KtlsDirection, String> {
        let (version, next) = match (&mut self.schedule, transmit) {
            (KeySchedule::Server(keys), true) => (keys.protocol_version(), keys.update_tx_secret()),
            (KeySchedule::Server(keys), false) => {
                (keys.protocol_version(), keys.update_rx_secret())
            }
            (KeySchedule::Client(keys), true) => (keys.protocol_version(), keys.update_tx_secret()),
            (KeySchedule::Client(keys), false) => {
                (keys.protocol_version(), keys.update_rx_secret())
            }
        };
        let next = next.map_err(|error| format!("no next traffic secret: {error}"))?;
        ktls_direction(version, next)
    }

    /// Follows a handshake record the peer sent after kernel TLS took over, which must be one
    /// TLS 1.3 KeyUpdate (a key change ends a record): the kernel gets the next receive key.
    /// When the peer asked for wsplice's own update, it is sent now if the socket has room,
    /// else it is owed (`answer_key_update` before the next write).
    pub fn follow_key_update(&mut self, socket: BorrowedFd, record: &[u8]) -> Result<(), String> {
        let &[KEY_UPDATE, 0, 0, 1, request] = record else {
            return Err(format!(
                "a {}-byte handshake record (message type {:?}) after kernel TLS took over",
                record.len(),
                record.first()
            ));
        };
        if request > 1 {
            return Err(format!("a KeyUpdate with request {request}"));
        }
        let receive = self.next_secret(false)?;
        crate::sys::ktls_set(socket, false, &receive).map_err(|error| {
            format!(
                "this kernel cannot take a new receive key ({error}): following TLS 1.3 key \
                 updates under kernel TLS needs Linux 6.14 or newer"
            )
        })?;
        self.answer_owed |= request == 1;
        match self.answer_key_update(socket) {
            Err(error) if error.kind() != io::ErrorKind::WouldBlock => {
                Err(format!("answering a KeyUpdate: {error}"))
            }
            _ => Ok(()),
        }
    }

    /// Whether wsplice's own KeyUpdate must go out before its next data record.
    pub fn answer_owed(&self) -> bool {
        self.answer_owed
    }

    /// Sends an owed KeyUpdate (not requesting one back) under the current transmit key, then
    /// gives the kernel the next one. Never blocks: WouldBlock when the socket has no room.
    pub fn answer_key_update(&mut self, socket: BorrowedFd) -> io::Result<()> {
        if !self.answer_owed {
            return Ok(());
        }
        const NOT_REQUESTED: [u8; 5] = [KEY_UPDATE, 0, 0, 1, 0];
        crate::sys::ktls_send_control(
            socket,
            crate::sys::TLS_RECORD_TYPE_HANDSHAKE,
            &NOT_REQUESTED,
        )?;
        self.answer_owed = false;
        let transmit = self.next_secret(true).map_err(io::Error::other)?;
        crate::sys::ktls_set(socket, true, &transmit)
    }
}

/// Moves a finished handshake into kernel TLS on `socket` (the tls ULP attached), keeping
/// rustls's key schedule for the key updates to come.
fn into_kernel<Data>(
    socket: BorrowedFd,
    handed: Result<(rustls::ExtractedSecrets, KernelConnection<Data>), rustls::Error>,
    schedule: impl FnOnce(KernelConnection<Data>) -> KeySchedule,
) -> io::Result<KernelKeys> {
    let (secrets, connection) = handed.map_err(io::Error::other)?;
    install_secrets(socket, connection.protocol_version(), secrets)?;
    Ok(KernelKeys {
        schedule: schedule(connection),
        answer_owed: false,
    })
}

/// Moves a finished server handshake into kernel TLS on `socket` (the tls ULP attached).
pub fn server_into_kernel(
    connection: UnbufferedServerConnection,
    socket: BorrowedFd,
) -> io::Result<KernelKeys> {
    into_kernel(
        socket,
        connection.dangerous_into_kernel_connection(),
        |keys| KeySchedule::Server(Box::new(keys)),
    )
}

/// The largest TLS record a peer may send: 2^14 bytes of plaintext plus expansion.
const MAX_RECORD: usize = (1 << 14) + 2048;

/// rustls's unbuffered connection, server or client side, as the whole-record handshake
/// drives it.
trait Unbuffered {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

/// A server handshake that reads whole TLS records only, so nothing the client sent after its
/// Finished (the HTTP request often comes in the same flight) leaves the kernel: kernel TLS can
/// take the connection from the next record on. Returns the connection with its handshake done
/// and everything it had to send (TLS 1.3 session tickets included) written.
pub async fn handshake_whole_records(
    config: Arc<ServerConfig>,
    stream: &mut TcpStream,
) -> io::Result<UnbufferedServerConnection> {
    let mut connection = UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
    finish_handshake_whole_records(&mut connection, stream).await?;
    Ok(connection)
}

/// What the handshake loop does after handling one state.
enum Next {
    Process,
    Transmit,
    ReadRecord,
    Finished,
}

/// Drives a handshake to its end, reading one whole TLS record at a time. After a failure,
/// the alert rustls queued goes out before the error is returned.
async fn finish_handshake_whole_records(
    connection: &mut impl Unbuffered,
    stream: &mut TcpStream,
) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut incoming = Vec::with_capacity(MAX_RECORD + 5);
    let mut outgoing = Vec::new();
    let mut failure: Option<io::Error> = None;
    loop {
        let status = connection.process(&mut incoming);
        let discard = status.discard;
        let next = match status.state {
            Ok(ConnectionState::EncodeTlsData(mut record)) => {
                let start = outgoing.len();
                outgoing.resize(start + MAX_RECORD, 0);
                let written = match record.encode(&mut outgoing[start..]) {
                    Err(EncodeError::InsufficientSize(size)) => {
                        outgoing.resize(start + size.required_size, 0);
                        record.encode(&mut outgoing[start..])
                    }
                    other => other,
                }
                .map_err(io::Error::other)?;
                outgoing.truncate(start + written);
                Next::Process
            }
            Ok(ConnectionState::TransmitTlsData(transmit)) => {
                transmit.done(); // the bytes are in `outgoing`, written below
                Next::Transmit
            }
            _ if failure.is_some() => Next::Finished,
            Ok(ConnectionState::BlockedHandshake) => Next::ReadRecord,
            Ok(ConnectionState::WriteTraffic(_)) => Next::Finished,
            Ok(other) => {
                failure = Some(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{other:?} before the handshake finished"),
                ));
                Next::Process
            }
            Err(error) => {
                failure = Some(io::Error::new(io::ErrorKind::InvalidData, error));
                Next::Process
            }
        };
        incoming.drain(..discard);
        match next {
            Next::Process => {}
            Next::Transmit => {
                stream.write_all(&outgoing).await?;
                outgoing.clear();
            }
            Next::ReadRecord => {
                let mut header = [0u8; 5];
                stream.read_exact(&mut header).await?;
                let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
                if length > MAX_RECORD {
                    failure = Some(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a TLS record of {length} bytes"),
                    ));
                    continue;
                }
                let start = incoming.len();
                incoming.extend_from_slice(&header);
                incoming.resize(start + 5 + length, 0);
                stream.read_exact(&mut incoming[start + 5..]).await?;
            }
            Next::Finished => {
                if let Some(error) = failure {
                    let _ = stream.write_all(&outgoing).await;
                    return Err(error);
                }
                stream.write_all(&outgoing).await?;
                if !incoming.is_empty() {
                    return Err(io::Error::other(
                        "rustls left records unread after the handshake",
                    ));
                }
                return Ok(());
            }
        }
    }
}

/// A wss:// member's connection on kernel TLS: the tls ULP attached to the connected socket,
/// the client handshake read in whole records, then the keys handed to the kernel, so the
/// upgrade request and everything after go through kernel TLS. The member's TLS 1.3 session
/// tickets, which come after the handshake, are skipped by the reader.
pub async fn connect_kernel_tls(
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    mut socket: TcpStream,
) -> io::Result<KtlsStream> {
    use std::os::fd::AsFd;
    crate::sys::ktls_attach(socket.as_fd())?;
    let mut connection =
        UnbufferedClientConnection::new(config, server_name).map_err(io::Error::other)?;
    finish_handshake_whole_records(&mut connection, &mut socket).await?;
    let keys = into_kernel(
        socket.as_fd(),
        connection.dangerous_into_kernel_connection(),
        |keys| KeySchedule::Client(Box::new(keys)),
    )?;
    Ok(KtlsStream {
        socket,
        keys,
        closed_by_peer: false,
    })
}

/// The handshake message a member sends after the handshake (TLS 1.3).
const NEW_SESSION_TICKET: u8 = 4;

/// Whether a handshake record read after kernel TLS took over holds only session tickets
/// (skipped: wsplice does not resume sessions towards members).
pub fn only_session_tickets(mut messages: &[u8]) -> bool {
    if messages.is_empty() {
        return false;
    }
    while let [kind, a, b, c, rest @ ..] = messages {
        let length = usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c);
        if *kind != NEW_SESSION_TICKET || rest.len() < length {
            return false;
        }
        messages = &rest[length..];
    }
    messages.is_empty()
}

/// Whether kernel TLS can be attached here: tried on a loopback connection (the attempt also
/// loads the module where it is one). The error says why not.
pub fn kernel_tls_works() -> Result<(), String> {
    use std::os::fd::AsFd;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    let _client = std::net::TcpStream::connect(address).map_err(|e| e.to_string())?;
    let (accepted, _) = listener.accept().map_err(|e| e.to_string())?;
    crate::sys::ktls_attach(accepted.as_fd()).map_err(|error| match error.raw_os_error() {
        Some(libc::ENOENT) => "this kernel offers no kernel TLS (CONFIG_TLS)".to_string(),
        _ => format!("kernel TLS cannot be attached: {error}"),
    })
}

/// The name a wss:// member is verified against and sent as SNI: the url's host.
pub fn member_server_name(host: &str) -> Result<ServerName<'static>, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|error| format!("{host:?}: {error}"))
}

/// A connection after the TLS stage: plain TCP, TLS by rustls over TCP, or TCP with kernel
/// TLS (the kernel encrypts and decrypts; userspace sees plaintext).
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
    Ktls(KtlsStream),
}

/// A TCP socket with kernel TLS in both directions. Reads take the record type along, so the
/// peer's close_notify reads as EOF; shutting down sends one.
#[derive(Debug)]
pub struct KtlsStream {
    socket: TcpStream,
    keys: KernelKeys,
    closed_by_peer: bool,
}

impl KtlsStream {
    /// Moves a finished server handshake into kernel TLS on its socket, to which the tls ULP
    /// was attached before the handshake (the ULP joins only an established socket, and a
    /// client may have half-closed by the end of the handshake).
    pub fn install(connection: UnbufferedServerConnection, socket: TcpStream) -> io::Result<Self> {
        use std::os::fd::AsFd;
        let keys = server_into_kernel(connection, socket.as_fd())?;
        Ok(KtlsStream {
            socket,
            keys,
            closed_by_peer: false,
        })
    }

    /// The socket, rustls's key schedule, and whether the peer's close_notify was already
    /// read.
    pub fn into_parts(self) -> (TcpStream, KernelKeys, bool) {
        (self.socket, self.keys, self.closed_by_peer)
    }
}

impl AsyncRead for KtlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        use std::os::fd::AsFd;
        let this = self.get_mut();
        if this.closed_by_peer {
            return Poll::Ready(Ok(()));
        }
        loop {
            std::task::ready!(this.socket.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let received = this.socket.try_io(tokio::io::Interest::READABLE, || {
                crate::sys::ktls_recv(this.socket.as_fd(), unfilled, 0)
            });
            return Poll::Ready(match received {
                Ok(crate::sys::KtlsRecord::Data(read)) => {
                    buf.advance(read);
                    Ok(())
                }
                Ok(crate::sys::KtlsRecord::Control {
                    record_type: crate::sys::TLS_RECORD_TYPE_ALERT,
                    len,
                }) if len >= 2 && unfilled[1] == 0 => {
                    this.closed_by_peer = true; // close_notify: EOF
                    Ok(())
                }
                // A member's TLS 1.3 session tickets: nothing to pass on.
                Ok(crate::sys::KtlsRecord::Control {
                    record_type: crate::sys::TLS_RECORD_TYPE_HANDSHAKE,
                    len,
                }) if only_session_tickets(&unfilled[..len]) => continue,
                Ok(crate::sys::KtlsRecord::Control {
                    record_type: crate::sys::TLS_RECORD_TYPE_HANDSHAKE,
                    len,
                }) => match this
                    .keys
                    .follow_key_update(this.socket.as_fd(), &unfilled[..len])
                {
                    Ok(()) => continue,
                    Err(why) => Err(io::Error::other(why)),
                },
                Ok(crate::sys::KtlsRecord::Control { record_type, len }) => {
                    Err(io::Error::other(format!(
                        "a TLS record of type {record_type} ({len} bytes) after kernel TLS \
                         took over"
                    )))
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => Err(error),
            });
        }
    }
}

impl AsyncWrite for KtlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        use std::os::fd::AsFd;
        let this = self.get_mut();
        // A KeyUpdate the peer asked for goes out before the next data record.
        while this.keys.answer_owed() {
            std::task::ready!(this.socket.poll_write_ready(cx))?;
            let (socket, keys) = (&this.socket, &mut this.keys);
            match socket.try_io(tokio::io::Interest::WRITABLE, || {
                keys.answer_key_update(socket.as_fd())
            }) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Poll::Ready(Err(error)),
                Ok(()) => {}
            }
        }
        Pin::new(&mut this.socket).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        use std::os::fd::AsFd;
        let this = self.get_mut();
        loop {
            std::task::ready!(this.socket.poll_write_ready(cx))?;
            match this.socket.try_io(tokio::io::Interest::WRITABLE, || {
                crate::sys::ktls_send_close_notify(this.socket.as_fd())
            }) {
                Ok(()) => break,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                // The peer is gone: nothing to notify.
                Err(_) => break,
            }
        }
        Pin::new(&mut this.socket).poll_shutdown(cx)
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
            Stream::Ktls(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
            Stream::Ktls(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
            Stream::Ktls(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    /// TLS: close_notify, then the TCP FIN (TLS 1.3 and rustls keep reading after it).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
            Stream::Ktls(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Ktls(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(stream) => stream.is_write_vectored(),
            Stream::Tls(stream) => stream.is_write_vectored(),
            Stream::Ktls(stream) => stream.is_write_vectored(),
        }
    }
}
