//! The HTTP stage: read the client's request ([`crate::client`] for a connection's first
//! upgrade, hyper for the rest), validate a WebSocket upgrade (RFC 6455
//! section 4.2.1), route it, forward it to a member with Host kept and X-Forwarded-* added, and
//! relay the member's answer. A 101 hands both sockets to the data plane; any other answer goes
//! to the client as it is. Plain requests are reverse-proxied one by one. A plain listener
//! set to redirect answers everything with a 301 to https://.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::balancer::{Lease, NoMember, PickRequest};
use crate::client::{FirstRequest, Rewind};
use crate::config::ServerSettings;
use crate::router::{Cluster, Member};
use crate::server::Shared;
use crate::tls::Stream;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// What the listener a connection came through asks of it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Entry {
    /// The client's leg is TLS (X-Forwarded-Proto: https).
    pub tls: bool,
    pub redirect_to_https: bool,
}

/// Serves one client connection until it closes or upgrades. The first request is read by
/// [`crate::client`]: an upgrade is answered here, anything else (and every request after an
/// upgrade refused with keep-alive) by hyper.
pub async fn serve(mut stream: Stream, client: SocketAddr, shared: Arc<Shared>, entry: Entry) {
    let settings = &shared.settings;
    // A redirecting listener answers everything alike: hyper has it all.
    let mut read = BytesMut::new();
    if !entry.redirect_to_https {
        let limits = crate::client::Limits {
            max_headers: settings.max_headers,
            max_head_bytes: settings.max_header_bytes.max(8192),
            timeout: settings.handshake_timeout,
        };
        read = match crate::client::read_first(&mut stream, limits).await {
            FirstRequest::Upgrade(request, rest) => {
                // Boxed: the handshake's state is freed before the pair is carried, rather
                // than kept in this task for the pair's life.
                let answered = Box::pin(answer_upgrade(
                    stream, request, rest, client, &shared, entry,
                ))
                .await;
                match answered {
                    Answered::Switched(CarriedPair {
                        client: stream,
                        client_early,
                        member,
                        member_early,
                        lease,
                    }) => {
                        Arc::clone(&shared.dataplane)
                            .carry(stream, client_early, member, member_early, lease)
                            .await;
                        return;
                    }
                    Answered::KeptOpen(kept, rest) => {
                        stream = kept;
                        rest
                    }
                    Answered::Closed => return,
                }
            }
            FirstRequest::ForHyper(read) => read,
            FirstRequest::Gone(why) => {
                tracing::debug!("client {client}: connection ended: {why}");
                return;
            }
            FirstRequest::Stalled(after) => {
                tracing::info!(
                    "client {client}: connection ended: no whole request within {after:?}"
                );
                return;
            }
        };
    }
    serve_with_hyper(Rewind::new(read.freeze(), stream), client, shared, entry).await;
}

/// Where answering a connection's first request, an upgrade, left the connection.
enum Answered {
    /// The 101 was sent: the pair is the data plane's.
    Switched(CarriedPair),
    /// Refused with keep-alive: the connection, and the bytes read after the request.
    KeptOpen(Stream, BytesMut),
    Closed,
}

/// Both legs of an upgraded pair, with the bytes each sent early.
struct CarriedPair {
    client: Stream,
    client_early: Bytes,
    member: Stream,
    member_early: Bytes,
    lease: Lease,
}

/// The first request was an upgrade: the member's 101 goes to the client in one write. Any
/// other answer is written whole; the connection is then kept unless the client asked to
/// close.
async fn answer_upgrade(
    mut stream: Stream,
    request: Request<()>,
    rest: BytesMut,
    client: SocketAddr,
    shared: &Shared,
    entry: Entry,
) -> Answered {
    let (host, path) = host_and_path(&request);
    let keep_alive = !has_token(request.headers(), header::CONNECTION, "close");
    let outcome = match shared.router.route(host.as_deref(), &path) {
        Some(cluster) => upgrade(request, cluster, &path, client, shared, entry).await,
        None => Err(no_route(host.as_deref(), &path, client)),
    };
    let response = match outcome {
        Ok(switched) => {
            let head = crate::head::response_head(
                StatusCode::SWITCHING_PROTOCOLS,
                None,
                &switched.headers,
            );
            if let Err(error) = write_whole(&mut stream, &head).await {
                tracing::info!("client {client}: gone before the 101 was sent: {error}");
                return Answered::Closed;
            }
            return Answered::Switched(CarriedPair {
                client: stream,
                client_early: rest.freeze(),
                member: switched.stream,
                member_early: switched.early,
                lease: switched.lease,
            });
        }
        Err(response) => response,
    };
    match write_answer(&mut stream, response, keep_alive).await {
        Ok(()) if keep_alive => Answered::KeptOpen(stream, rest),
        Ok(()) => {
            let _ = stream.shutdown().await;
            Answered::Closed
        }
        Err(error) => {
            tracing::debug!("client {client}: gone before the answer was sent: {error}");
            Answered::Closed
        }
    }
}

/// Writes an answer made by the HTTP stage as hyper would: its length set, `Connection: close`
/// when the connection closes after it.
async fn write_answer(
    stream: &mut Stream,
    response: Response<Body>,
    keep_alive: bool,
) -> std::io::Result<()> {
    let (mut parts, body) = response.into_parts();
    // Every answer made here is whole already.
    let body = body
        .collect()
        .await
        .map(|whole| whole.to_bytes())
        .unwrap_or_default();
    let bodiless = parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    if !bodiless {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    if !keep_alive {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
    let mut bytes = crate::head::response_head(
        parts.status,
        reason.map(|reason| reason.as_bytes()),
        &parts.headers,
    );
    if !bodiless {
        bytes.extend_from_slice(&body);
    }
    write_whole(stream, &bytes).await
}

/// Writes `bytes` and pushes them out (a TLS stream holds them until flushed).
async fn write_whole(stream: &mut Stream, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Serves requests with hyper until the connection closes or upgrades.
async fn serve_with_hyper(stream: Rewind, client: SocketAddr, shared: Arc<Shared>, entry: Entry) {
    let settings = &shared.settings;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.handshake_timeout)
        .max_headers(settings.max_headers)
        .max_buf_size(settings.max_header_bytes.max(8192))
        .auto_date_header(false);
    let service_shared = Arc::clone(&shared);
    let service = hyper::service::service_fn(move |request| {
        let shared = Arc::clone(&service_shared);
        async move { Ok::<_, Infallible>(handle(request, client, shared, entry).await) }
    });
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(error) = connection.await {
        // A client gone while hyper closed the connection is ordinary; anything else (hyper
        // has already answered a malformed request with 400, 431 or 414 where it could) is
        // worth a line.
        let gone = std::error::Error::source(&error)
            .and_then(|source| source.downcast_ref::<std::io::Error>())
            .is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::NotConnected
                        | std::io::ErrorKind::UnexpectedEof
                )
            });
        if gone {
            tracing::debug!("client {client}: connection ended: {error}");
        } else {
            tracing::info!("client {client}: connection ended: {error}");
        }
    }
}

fn text(status: StatusCode, message: &str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(format!("{message}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn header_str(headers: &HeaderMap, name: HeaderName) -> Option<&str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// Whether a comma-separated header carries `token` (case-insensitive), across repeats.
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| item.trim().eq_ignore_ascii_case(token))
}

/// A request that asks for any protocol switch, valid or not.
pub(crate) fn wants_upgrade<B>(request: &Request<B>) -> bool {
    request.headers().contains_key(header::UPGRADE)
        || request.headers().contains_key(header::SEC_WEBSOCKET_KEY)
        || has_token(request.headers(), header::CONNECTION, "upgrade")
}

/// RFC 6455 section 4.2.1: what a server must find in an opening handshake.
pub fn validate_upgrade<B>(request: &Request<B>) -> Result<(), &'static str> {
    let headers = request.headers();
    if request.method() != Method::GET {
        return Err("a WebSocket upgrade must use GET");
    }
    if request.version() != Version::HTTP_11 {
        return Err("a WebSocket upgrade needs HTTP/1.1");
    }
    if !headers.contains_key(header::HOST) {
        return Err("the request has no Host header");
    }
    if !has_token(headers, header::UPGRADE, "websocket") {
        return Err("the Upgrade header must name websocket");
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Err("the Connection header must contain upgrade");
    }
    match header_str(headers, header::SEC_WEBSOCKET_KEY) {
        None => return Err("the Sec-WebSocket-Key header is missing"),
        Some(key) if !is_websocket_key(key) => {
            return Err("Sec-WebSocket-Key must be 16 bytes in base64");
        }
        Some(_) => {}
    }
    if header_str(headers, header::SEC_WEBSOCKET_VERSION).map(str::trim) != Some("13") {
        return Err("Sec-WebSocket-Version must be 13");
    }
    Ok(())
}

/// 16 bytes in base64: 22 alphabet characters, the last carrying no stray bits, then "==".
fn is_websocket_key(key: &str) -> bool {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let key = key.trim().as_bytes();
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22].iter().all(|c| ALPHABET.contains(c))
        && ALPHABET
            .iter()
            .position(|&c| c == key[21])
            .is_some_and(|value| value & 0x0f == 0)
}

/// The seed's `RewriteRule ^(.*)$ https://%{HTTP_HOST}%{REQUEST_URI} [R=301,L]`.
fn redirect_to_https(host: Option<&str>, path: &str, client: SocketAddr) -> Response<Body> {
    let location = host.map(crate::router::host_without_port).and_then(|name| {
        // The https:// listener is on the default port; a v6 literal keeps its brackets.
        let name = if name.contains(':') {
            format!("[{name}]")
        } else {
            name.to_string()
        };
        HeaderValue::from_str(&format!("https://{name}{path}")).ok()
    });
    let Some(location) = location else {
        tracing::info!("client {client}: 400: no usable Host to redirect to https://");
        return text(
            StatusCode::BAD_REQUEST,
            "the request has no usable Host header",
        );
    };
    let mut response = text(StatusCode::MOVED_PERMANENTLY, "moved to https://");
    response.headers_mut().insert(header::LOCATION, location);
    response
}

async fn handle(
    mut request: Request<Incoming>,
    client: SocketAddr,
    shared: Arc<Shared>,
    entry: Entry,
) -> Response<Body> {
    let (host, path) = host_and_path(&request);
    if entry.redirect_to_https {
        return redirect_to_https(host.as_deref(), &path, client);
    }
    let Some(cluster) = shared.router.route(host.as_deref(), &path) else {
        return no_route(host.as_deref(), &path, client);
    };
    if !wants_upgrade(&request) {
        return proxy_plain(request, client, cluster, &shared, entry).await;
    }
    let client_upgrade = hyper::upgrade::on(&mut request);
    let switched = match upgrade(request, cluster, &path, client, &shared, entry).await {
        Ok(switched) => switched,
        Err(response) => return response,
    };
    let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *response.headers_mut() = switched.headers;
    let dataplane = Arc::clone(&shared.dataplane);
    tokio::spawn(async move {
        let upgraded = match client_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                tracing::info!("client {client}: gone before the 101 was sent: {error}");
                return;
            }
        };
        match upgraded.downcast::<TokioIo<Rewind>>() {
            Ok(parts) => {
                // Hyper read `read_buf` before what it left of the bytes put back.
                let (unread, stream) = parts.io.into_inner().into_parts();
                let early = if unread.is_empty() {
                    parts.read_buf
                } else {
                    [parts.read_buf, unread].concat().into()
                };
                dataplane
                    .carry(
                        stream,
                        early,
                        switched.stream,
                        switched.early,
                        switched.lease,
                    )
                    .await;
            }
            Err(_) => tracing::error!("client {client}: upgraded connection lost its type"),
        }
    });
    response
}

/// The request's Host and its path with the query, as routing and forwarding take them.
fn host_and_path<B>(request: &Request<B>) -> (Option<String>, String) {
    let host = header_str(request.headers(), header::HOST).map(str::to_owned);
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    (host, path)
}

/// The answer to a request no route takes.
fn no_route(host: Option<&str>, path: &str, client: SocketAddr) -> Response<Body> {
    tracing::info!(
        "client {client}: 404: no route for host {:?} path {path}",
        host.unwrap_or("")
    );
    text(StatusCode::NOT_FOUND, "no route for this host and path")
}

/// An upgrade request, checked and offered to the cluster's members in turn. Ok: a member
/// switched protocols; Err: the answer the client gets instead.
async fn upgrade<B>(
    request: Request<B>,
    cluster: &Cluster,
    path: &str,
    client: SocketAddr,
    shared: &Shared,
    entry: Entry,
) -> Result<Switched, Response<Body>> {
    if let Err(reason) = validate_upgrade(&request) {
        tracing::info!("client {client}: 400: {reason}");
        shared
            .stats
            .rejected_upgrades
            .fetch_add(1, Ordering::Relaxed);
        let mut response = text(StatusCode::BAD_REQUEST, reason);
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Err(response);
    }
    let (parts, _) = request.into_parts();
    let forwarded = forwarded_headers(parts.headers, client, entry.tls);
    let attempt = tokio::time::timeout(
        shared.settings.handshake_timeout,
        upgrade_member(cluster, &parts.method, path, &forwarded, client, shared),
    )
    .await;
    match attempt {
        Err(_) => {
            tracing::warn!(
                "client {client}: 504: no member answered the upgrade within {:?}",
                shared.settings.handshake_timeout
            );
            Err(text(
                StatusCode::GATEWAY_TIMEOUT,
                "the member did not answer in time",
            ))
        }
        Ok(Err(failure)) => Err(failure.response(client, cluster)),
        Ok(Ok(MemberAnswer::Other(response))) => Err(response),
        Ok(Ok(MemberAnswer::Switched(switched))) => {
            shared.stats.upgrades.fetch_add(1, Ordering::Relaxed);
            Ok(switched)
        }
    }
}

/// The member's side of a successful upgrade.
struct Switched {
    /// The 101's headers for the client: the member's, and the route cookie's `Set-Cookie`
    /// when the client needs one.
    headers: HeaderMap,
    stream: Stream,
    /// Bytes the member sent right after its 101.
    early: Bytes,
    lease: Lease,
}

enum MemberAnswer {
    Switched(Switched),
    /// A non-101 answer, passed to the client as it is.
    Other(Response<Body>),
}

/// Why no member took the request; `retry` errors were tried on the next member.
enum Failure {
    NoMemberUsable,
    /// Every member that could take it is at its connection limit.
    AllFull,
    AllFailed(Vec<String>),
}

impl Failure {
    /// Nothing could be tried (`no_member`), or everything tried failed (`reasons`).
    fn of(no_member: NoMember, reasons: Vec<String>) -> Failure {
        match (reasons.is_empty(), no_member) {
            (false, _) => Failure::AllFailed(reasons),
            (true, NoMember::AllFull) => Failure::AllFull,
            (true, NoMember::NoneUsable) => Failure::NoMemberUsable,
        }
    }
}

impl Failure {
    fn response(self, client: SocketAddr, cluster: &Cluster) -> Response<Body> {
        match self {
            Failure::NoMemberUsable => {
                tracing::warn!(
                    "client {client}: 503: cluster {} has no usable member",
                    cluster.name
                );
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no member can take this request",
                )
            }
            Failure::AllFull => {
                tracing::warn!(
                    "client {client}: 503: every usable member of cluster {} is at its \
                     connection limit",
                    cluster.name
                );
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "every member is at its connection limit",
                )
            }
            Failure::AllFailed(reasons) => {
                tracing::warn!(
                    "client {client}: 502: every member of cluster {} failed: {}",
                    cluster.name,
                    reasons.join("; ")
                );
                text(StatusCode::BAD_GATEWAY, "no member could be reached")
            }
        }
    }
}

/// Headers for the member: the client's, with X-Forwarded-For/-Proto/-Host added.
fn forwarded_headers(mut headers: HeaderMap, client: SocketAddr, tls: bool) -> HeaderMap {
    let for_name = HeaderName::from_static("x-forwarded-for");
    let client_ip = client.ip().to_string();
    let chain = match header_str(&headers, for_name.clone()) {
        Some(earlier) => format!("{earlier}, {client_ip}"),
        None => client_ip,
    };
    if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(chain)) {
        headers.insert(for_name, value);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
    // The Host the request was routed by (a clone of a value is a reference count).
    if let Some(host) = headers
        .get(header::HOST)
        .filter(|value| value.to_str().is_ok())
        .cloned()
    {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host);
    }
    headers
}

/// Starts a connection to a member; it may still be on its way up when this returns.
/// `sending_at_once`: the caller writes as soon as the connection is up, so the handshake's
/// last ACK is held back to leave with those bytes (a packet fewer).
fn start_connect(
    address: SocketAddr,
    settings: &ServerSettings,
    sending_at_once: bool,
) -> Result<TcpStream, String> {
    let (receive, send) = settings.socket_buffers();
    let started = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM.nonblocking(),
        Some(socket2::Protocol::TCP),
    )
    .and_then(|socket| {
        socket.set_recv_buffer_size(receive)?;
        socket.set_send_buffer_size(send)?;
        socket.set_tcp_nodelay(true)?;
        if sending_at_once {
            socket.set_tcp_quickack(false)?;
        }
        match socket.connect(&address.into()) {
            Err(error) if error.raw_os_error() != Some(libc::EINPROGRESS) => Err(error),
            _ => TcpStream::from_std(socket.into()),
        }
    });
    started.map_err(|error| format!("{address}: {error}"))
}

/// Waits, at most `connect_timeout`, until a started connection is up.
async fn connected(
    stream: &TcpStream,
    address: SocketAddr,
    settings: &ServerSettings,
) -> Result<(), String> {
    let timeout = settings.connect_timeout;
    match tokio::time::timeout(timeout, stream.writable()).await {
        Ok(Ok(())) => match stream.take_error() {
            Ok(None) => Ok(()),
            Ok(Some(error)) | Err(error) => Err(format!("{address}: {error}")),
        },
        Ok(Err(error)) => Err(format!("{address}: {error}")),
        Err(_) => Err(format!("{address}: connect timed out after {timeout:?}")),
    }
}

/// Connects to a member (for wss://, also the TLS handshake, its certificate verified) and
/// sends it `head`. A wss:// member's TLS ends in kernel TLS when `kernel_tls` (the tunnel is
/// then spliced), in rustls otherwise.
async fn open_member(
    member: &Member,
    settings: &ServerSettings,
    kernel_tls: bool,
    head: &[u8],
) -> Result<Stream, String> {
    let address = member.address;
    let stream = start_connect(address, settings, member.tls.is_none() && !head.is_empty())?;
    let Some(tls) = &member.tls else {
        // A near member's connection is up by the time connect returns: the head goes out
        // at once instead of after the reactor has seen the socket writable.
        let sent = match socket2::SockRef::from(&stream).send(head) {
            Ok(sent) => sent,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                connected(&stream, address, settings).await?;
                0
            }
            Err(error) => return Err(format!("{address}: {error}")),
        };
        let mut stream = Stream::Plain(stream);
        send_head(&mut stream, &head[sent..], member).await?;
        return Ok(stream);
    };
    connected(&stream, address, settings).await?;
    let mut stream = if kernel_tls {
        let connected = crate::tls::connect_kernel_tls(
            std::sync::Arc::clone(&tls.config),
            tls.server_name.clone(),
            stream,
        );
        match tokio::time::timeout(settings.handshake_timeout, connected).await {
            Ok(Ok(stream)) => Stream::Ktls(stream),
            Ok(Err(error)) => return Err(format!("{}: TLS: {error}", member.url)),
            Err(_) => {
                return Err(format!(
                    "{}: TLS: no handshake within {:?}",
                    member.url, settings.handshake_timeout
                ));
            }
        }
    } else {
        match tls.connector.connect(tls.server_name.clone(), stream).await {
            Ok(stream) => Stream::Tls(Box::new(stream.into())),
            Err(error) => return Err(format!("{}: TLS: {error}", member.url)),
        }
    };
    send_head(&mut stream, head, member).await?;
    Ok(stream)
}

/// Writes the upgrade request's head to a member whose connection (and TLS) is up.
async fn send_head(stream: &mut Stream, head: &[u8], member: &Member) -> Result<(), String> {
    let sent = match stream.write_all(head).await {
        Ok(()) => stream.flush().await,
        Err(error) => Err(error),
    };
    sent.map_err(|error| format!("{}: sending the request: {error}", member.url))
}

/// Tries members in balancer order, each at most once, until one answers.
async fn upgrade_member(
    cluster: &Cluster,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    client: SocketAddr,
    shared: &Shared,
) -> Result<MemberAnswer, Failure> {
    let mut tried = vec![false; cluster.members.len()];
    let mut reasons = Vec::new();
    let (route, hash) = affinity(cluster, headers, path, client);
    // One head for every member tried.
    let head = crate::head::request_head(method, path, headers);
    let no_member = loop {
        let request = PickRequest {
            now_ms: shared.router.now_ms(),
            hash,
            route: route.as_deref(),
        };
        let (lease, picked) = match Lease::pick(&cluster.balancer, &request, |i| tried[i]) {
            Ok(picked) => picked,
            Err(no_member) => break no_member,
        };
        let index = lease.member();
        tried[index] = true;
        let member = &cluster.members[index];
        let kernel_tls = shared.dataplane.kernel_tls_carried();
        let mut stream = match open_member(member, &shared.settings, kernel_tls, &head).await {
            Ok(stream) => stream,
            Err(reason) => {
                member_failed(cluster, index, &reason, shared);
                reasons.push(reason);
                continue;
            }
        };
        let limits = crate::member::Limits {
            max_headers: shared.settings.max_headers,
            max_head_bytes: shared.settings.max_header_bytes,
        };
        let mut answer = match crate::member::read_answer(&mut stream, limits).await {
            Ok(answer) => answer,
            Err(error) => {
                // Nothing usable was answered: the next member may take the same request.
                let reason = format!("{}: {error}", member.url);
                member_failed(cluster, index, &reason, shared);
                reasons.push(reason);
                continue;
            }
        };
        if answer.status != StatusCode::SWITCHING_PROTOCOLS {
            tracing::info!(
                "member {} answered the upgrade with {}",
                member.url,
                answer.status
            );
            return Ok(MemberAnswer::Other(
                passed_on(&mut stream, &mut answer, client, member).await,
            ));
        }
        // A client without a usable route learns its member's.
        if let (Some(cookie), false) = (&cluster.sticky_cookie, picked.sticky) {
            let set_cookie = crate::balancer::lock(&cluster.balancer)
                .route(index)
                .map(|route| crate::router::route_cookie(cookie, route))
                .and_then(|value| HeaderValue::from_str(&value).ok());
            if let Some(set_cookie) = set_cookie {
                answer.headers.append(header::SET_COOKIE, set_cookie);
            }
        }
        return Ok(MemberAnswer::Switched(Switched {
            headers: answer.headers,
            stream,
            early: answer.rest.freeze(),
            lease,
        }));
    };
    Err(Failure::of(no_member, reasons))
}

/// A member's non-101 answer for the client: its body read whole, hop-by-hop headers dropped
/// and the length set anew. A body that cannot be read (or is over `MAX_ANSWER_BODY`) gets a
/// 502; the member did answer, so it stays in use.
async fn passed_on(
    stream: &mut Stream,
    answer: &mut crate::member::Answer,
    client: SocketAddr,
    member: &Member,
) -> Response<Body> {
    let body = match crate::member::read_body(stream, answer).await {
        Ok(body) => body,
        Err(error) => {
            tracing::warn!(
                "client {client}: 502: the {} answer of member {} cannot be passed on: {error}",
                answer.status,
                member.url
            );
            return text(
                StatusCode::BAD_GATEWAY,
                "the member's answer cannot be passed on",
            );
        }
    };
    let mut response = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *response.status_mut() = answer.status;
    *response.headers_mut() = std::mem::take(&mut answer.headers);
    strip_hop_by_hop(response.headers_mut());
    response.headers_mut().remove(header::CONTENT_LENGTH);
    if let Some(reason) = answer.reason.take() {
        response.extensions_mut().insert(reason);
    }
    response
}

/// Passive health: a member that failed a connect or an upgrade stays out for `retry`.
fn member_failed(cluster: &Cluster, index: usize, reason: &str, shared: &Shared) {
    crate::balancer::lock(&cluster.balancer).failed(index, shared.router.now_ms());
    tracing::warn!(
        "member {} of cluster {} failed ({reason}); not used for {:?}",
        cluster.members[index].url,
        cluster.name,
        cluster.retry
    );
}

/// The sticky route and the hash key a request carries for its cluster.
fn affinity(
    cluster: &Cluster,
    headers: &HeaderMap,
    path: &str,
    client: SocketAddr,
) -> (Option<String>, Option<u64>) {
    let cookies: Vec<&str> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    let query = path.split_once('?').map(|(_, query)| query);
    let route = cluster
        .sticky
        .as_ref()
        .and_then(|sticky| crate::router::sticky_route(sticky, &cookies, query));
    let hash = (cluster.lbmethod == crate::config::LbMethod::Hash)
        .then(|| {
            let header = |name: &str| {
                headers
                    .get(name)
                    .and_then(|value| value.to_str().ok())
                    .map(str::to_owned)
            };
            crate::router::hash_of(&cluster.hash_key, client.ip(), header, &cookies)
        })
        .flatten();
    (route, hash)
}

/// Hop-by-hop headers (RFC 9110 section 7.6.1) that a proxy does not forward.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        HeaderName::from_static("keep-alive"),
    ] {
        headers.remove(name);
    }
}

/// Reverse-proxies a plain request to one member (tried in balancer order on connect failure).
async fn proxy_plain(
    request: Request<Incoming>,
    client: SocketAddr,
    cluster: &Cluster,
    shared: &Shared,
    entry: Entry,
) -> Response<Body> {
    let (mut parts, body) = request.into_parts();
    parts.headers = forwarded_headers(std::mem::take(&mut parts.headers), client, entry.tls);
    strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    if let Some(path) = parts.uri.path_and_query().cloned() {
        parts.uri = path.as_str().parse().unwrap_or(parts.uri);
    }
    let mut tried = vec![false; cluster.members.len()];
    let mut reasons = Vec::new();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let (route, hash) = affinity(cluster, &parts.headers, &path, client);
    let no_member = loop {
        let request = PickRequest {
            now_ms: shared.router.now_ms(),
            hash,
            route: route.as_deref(),
        };
        let lease = match Lease::pick(&cluster.balancer, &request, |i| tried[i]) {
            Ok((lease, _)) => lease,
            Err(no_member) => break no_member,
        };
        let index = lease.member();
        tried[index] = true;
        let member = &cluster.members[index];
        // Hyper sends the request: only the connection is made here.
        let stream = match open_member(member, &shared.settings, false, &[]).await {
            Ok(stream) => stream,
            Err(reason) => {
                member_failed(cluster, index, &reason, shared);
                reasons.push(reason);
                continue;
            }
        };
        let (mut sender, connection) = match hyper::client::conn::http1::handshake::<_, Incoming>(
            TokioIo::new(stream),
        )
        .await
        {
            Ok(parts) => parts,
            Err(error) => {
                reasons.push(format!("{}: {error}", member.address));
                continue;
            }
        };
        tokio::spawn(connection);
        let request = Request::from_parts(parts, body);
        return match sender.send_request(request).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body.boxed())
            }
            Err(error) => {
                tracing::warn!(
                    "client {client}: 502: member {} failed: {error}",
                    member.url
                );
                text(StatusCode::BAD_GATEWAY, "the member failed to answer")
            }
        };
    };
    Failure::of(no_member, reasons).response(client, cluster)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade_request() -> hyper::http::request::Builder {
        Request::builder()
            .method("GET")
            .uri("/ws")
            .header("Host", "example.com")
            .header("Upgrade", "websocket")
            .header("Connection", "keep-alive, Upgrade")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("Sec-WebSocket-Version", "13")
    }

    #[test]
    fn a_valid_upgrade_passes() {
        assert_eq!(
            validate_upgrade(&upgrade_request().body(()).unwrap()),
            Ok(())
        );
    }

    #[test]
    fn each_missing_piece_is_named() {
        let post = upgrade_request().method("POST").body(()).unwrap();
        assert!(validate_upgrade(&post).unwrap_err().contains("GET"));
        let old = upgrade_request()
            .version(Version::HTTP_10)
            .body(())
            .unwrap();
        assert!(validate_upgrade(&old).unwrap_err().contains("HTTP/1.1"));
        let mut request = upgrade_request().body(()).unwrap();
        request
            .headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("8"));
        assert!(validate_upgrade(&request).unwrap_err().contains("13"));
        request = upgrade_request().body(()).unwrap();
        request
            .headers_mut()
            .insert("sec-websocket-key", HeaderValue::from_static("short"));
        assert!(validate_upgrade(&request).unwrap_err().contains("16 bytes"));
        request = upgrade_request().body(()).unwrap();
        request
            .headers_mut()
            .insert("upgrade", HeaderValue::from_static("h2c"));
        assert!(
            validate_upgrade(&request)
                .unwrap_err()
                .contains("websocket")
        );
        request = upgrade_request().body(()).unwrap();
        request
            .headers_mut()
            .insert("connection", HeaderValue::from_static("close"));
        assert!(
            validate_upgrade(&request)
                .unwrap_err()
                .contains("Connection")
        );
    }

    #[test]
    fn websocket_keys_are_checked() {
        assert!(is_websocket_key("dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!is_websocket_key("dGhlIHNhbXBsZSBub25jZR=="));
        assert!(!is_websocket_key("dGhlIHNhbXBsZSBub25jZQ="));
    }

    #[test]
    fn forwarded_headers_extend_the_chain() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        headers.insert("host", HeaderValue::from_static("example.com"));
        let out = forwarded_headers(headers, "192.0.2.7:5000".parse().unwrap(), false);
        assert_eq!(out["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(out["x-forwarded-proto"], "http");
        assert_eq!(out["x-forwarded-host"], "example.com");
        assert_eq!(out["host"], "example.com");
    }
}
