//! Config pipeline: TOML text -> [`RawConfig`] (serde, unknown keys rejected) -> validated
//! [`Config`]. One validation path serves `wsplice check`, `wsplice run` and the quick form.
//! Every error names `file:line`.

use std::collections::HashMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// Default bound on bytes held per connection per direction (kernel + wsplice).
pub const DEFAULT_MAX_BUFFERED: u64 = 4 << 20;
/// Sockmap mode relays a pair in userspace for its first quarter second: health checks and
/// connections that leave at once close sooner and never pay for the kernel set-up; a
/// WebSocket that stays is offloaded for the rest of its life.
pub const DEFAULT_OFFLOAD_AFTER: Duration = Duration::from_millis(250);
/// A longer trial would keep long-lived pairs' bytes in userspace for nothing.
const MAX_OFFLOAD_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerSettings,
    pub listeners: Vec<ListenerConfig>,
    pub routes: Vec<Route>,
    pub clusters: Vec<ClusterConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Worker threads, each with its own SO_REUSEPORT listener per address.
    pub workers: usize,
    pub dataplane: DataplaneMode,
    /// Bound on bytes held per connection per direction, by the kernel and wsplice together.
    pub max_buffered_per_direction: u64,
    /// Client request and member 101 must both arrive within this time.
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// Hand TLS listeners' connections to kernel TLS after the handshake where the kernel has
    /// it (opt-in while the kernel TLS carrier is being completed).
    pub kernel_tls: bool,
    /// A tunnel with no byte either way for this long is closed (Apache's ProxyTimeout,
    /// HAProxy's `timeout tunnel`); None: never.
    pub idle_timeout: Option<Duration>,
    /// Sockmap mode: a pair is relayed in userspace this long before the kernel takes it, so
    /// pairs that close sooner never pay for the sockmap set-up; None: at once.
    pub offload_after: Option<Duration>,
}

impl ServerSettings {
    /// Socket buffer sizes (receive, send) that keep a pair within `max_buffered_per_direction`
    /// each way: the source's receive buffer (the kernel doubles the value for overhead) takes
    /// a quarter, the peer's send queue or the verdict's redirect limit a half, the relay one
    /// chunk. Set before the connection exists, so TCP never advertises a window the buffer
    /// cannot hold (a shrunk buffer makes the kernel drop segments, and retransmissions that
    /// overlap received bytes are what the sockmap path cannot handle).
    pub fn socket_buffers(&self) -> (usize, usize) {
        let bound = self.max_buffered_per_direction;
        ((bound / 8) as usize, (bound / 4) as usize)
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            dataplane: DataplaneMode::Auto,
            max_buffered_per_direction: DEFAULT_MAX_BUFFERED,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            kernel_tls: false,
            idle_timeout: None,
            offload_after: Some(DEFAULT_OFFLOAD_AFTER),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataplaneMode {
    /// sockmap where the kernel allows it, userspace relay otherwise.
    Auto,
    Sockmap,
    /// splice(2) through pipes driven by io_uring: no copy into userspace, no BPF.
    Splice,
    Userspace,
}

impl DataplaneMode {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(DataplaneMode::Auto),
            "sockmap" => Ok(DataplaneMode::Sockmap),
            "splice" => Ok(DataplaneMode::Splice),
            "userspace" => Ok(DataplaneMode::Userspace),
            other => Err(format!(
                "unknown dataplane {other:?} (expected auto, sockmap, splice or userspace)"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbMethod {
    /// Weighted round robin with Apache's lbfactor/lbstatus semantics.
    ByRequests,
    /// Fewest bytes moved relative to weight (Apache mod_lbmethod_bytraffic).
    ByTraffic,
    /// Fewest live tunnels relative to weight.
    LeastConn,
    /// Consistent hashing of a request key (client address, a header or a cookie).
    Hash,
}

impl LbMethod {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "byrequests" => Ok(LbMethod::ByRequests),
            "bytraffic" => Ok(LbMethod::ByTraffic),
            "least-conn" | "leastconn" | "bybusyness" => Ok(LbMethod::LeastConn),
            "hash" => Ok(LbMethod::Hash),
            other => Err(format!(
                "unknown lbmethod {other:?} (expected byrequests, bytraffic, least-conn or hash)"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    /// wss:// on this listener.
    pub tls: Option<ListenerTls>,
    /// Answer every request with a 301 to the same host and path on https://.
    pub redirect_to_https: bool,
}

#[derive(Debug, Clone)]
pub struct ListenerTls {
    /// Chosen by the client's SNI among the names each certificate is valid for; the first
    /// is the default.
    pub certificates: Vec<CertificateFiles>,
    pub unknown_sni: UnknownSni,
}

/// A PEM certificate chain (leaf first) and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What a client naming (by SNI) no configured certificate gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownSni {
    /// The default (first) certificate, as nginx and Apache do.
    Default,
    /// A refused handshake.
    Reject,
}

/// How a cluster's wss:// members are verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberTlsSettings {
    /// Trust only this CA file's certificates (instead of the system roots).
    pub ca_file: Option<PathBuf>,
    /// False only when the config says so explicitly: any certificate is accepted.
    pub verify: bool,
}

impl Default for MemberTlsSettings {
    fn default() -> Self {
        MemberTlsSettings {
            ca_file: None,
            verify: true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    /// Matches the request's Host without port, case-insensitively; `None` matches any host.
    pub host: Option<String>,
    /// Matches when the request path starts with it at a segment boundary.
    pub path_prefix: String,
    /// Index into [`Config::clusters`].
    pub cluster: usize,
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub name: String,
    pub lbmethod: LbMethod,
    /// What `lbmethod = "hash"` hashes.
    pub hash_key: HashKey,
    /// Where a request names its member's route (Apache `stickysession=`).
    pub sticky: Option<StickySession>,
    /// A cookie naming the member's route, set on the 101 (Apache's ROUTEID).
    pub sticky_cookie: Option<StickyCookie>,
    /// How long a member whose connect or upgrade failed stays out (Apache `retry=`).
    pub retry: Duration,
    /// Active health checks.
    pub health: Option<HealthSettings>,
    pub members: Vec<MemberConfig>,
    pub member_tls: MemberTlsSettings,
}

/// What a member may be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberStatus {
    Active,
    /// Hot standby (Apache `status=+H`): used only when no active member is usable.
    Standby,
    /// No new tunnels except sticky ones; existing tunnels stay (Apache `+N`).
    Drain,
    /// Never picked (Apache `+D`).
    Disabled,
}

/// What an active health check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    /// A TCP connect.
    Tcp,
    /// `GET path` answered with `expect_status`.
    Http,
    /// A WebSocket upgrade of `path` answered with 101.
    WebSocket,
}

/// `health = { check, path, expect_status, interval, timeout, rise, fall }` of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    pub kind: CheckKind,
    pub path: String,
    pub expect_status: u16,
    pub interval: Duration,
    pub timeout: Duration,
    /// Passes in a row that mark a down member up.
    pub rise: u32,
    /// Failures in a row that mark an up member down.
    pub fall: u32,
    /// Close the tunnels of a member marked down (HAProxy's on-marked-down
    /// shutdown-sessions); otherwise they stay until they end.
    pub shutdown_sessions: bool,
}

/// The request key of consistent hashing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    Header(String),
    Cookie(String),
}

impl HashKey {
    fn parse(text: &str) -> Result<Self, String> {
        let named = |rest: &str, what: &str| {
            let name = rest.trim();
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b';') {
                Err(format!("hash_key {text:?}: {what} needs a name"))
            } else {
                Ok(name.to_string())
            }
        };
        if text == "client-ip" {
            Ok(HashKey::ClientIp)
        } else if let Some(rest) = text.strip_prefix("header:") {
            Ok(HashKey::Header(named(rest, "header")?.to_ascii_lowercase()))
        } else if let Some(rest) = text.strip_prefix("cookie:") {
            Ok(HashKey::Cookie(named(rest, "cookie")?))
        } else {
            Err(format!(
                "hash_key {text:?}: expected client-ip, header:NAME or cookie:NAME"
            ))
        }
    }
}

/// Apache's `stickysession=COOKIE|param`: the cookie and the URL parameter that carry the
/// route (as `value.route`, or the route alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickySession {
    pub cookie: Option<String>,
    pub parameter: Option<String>,
}

/// The route cookie set on the 101.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickyCookie {
    pub name: String,
    pub path: String,
    pub secure: bool,
    pub http_only: bool,
    pub max_age: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct MemberConfig {
    pub url: String,
    pub address: SocketAddr,
    pub weight: u32,
    /// wss://: TLS to the member, verified against `host`.
    pub tls: bool,
    pub host: String,
    /// Apache `route=`.
    pub route: Option<String>,
    pub status: MemberStatus,
    /// Apache `max=`: tunnels at once; beyond, 503.
    pub max_conns: Option<u64>,
}

/// A config error: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        }
    }
}

/// All errors found in one file, printed one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.0.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default, rename = "listener")]
    listeners: Vec<RawListener>,
    #[serde(default, rename = "route")]
    routes: Vec<RawRoute>,
    #[serde(default, rename = "cluster")]
    clusters: Vec<RawCluster>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    workers: Option<Spanned<i64>>,
    dataplane: Option<Spanned<String>>,
    max_buffered_per_direction: Option<Spanned<RawSize>>,
    handshake_timeout: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    max_header_bytes: Option<Spanned<RawSize>>,
    max_headers: Option<Spanned<i64>>,
    kernel_tls: Option<bool>,
    idle_timeout: Option<Spanned<String>>,
    offload_after: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    address: Spanned<String>,
    tls: Option<Spanned<RawTls>>,
    redirect_to_https: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    #[serde(default)]
    more_certificates: Vec<RawCertificate>,
    unknown_sni: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    cert: Spanned<String>,
    key: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    host: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    cluster: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Spanned<String>,
    lbmethod: Option<Spanned<String>>,
    hash_key: Option<Spanned<String>>,
    stickysession: Option<Spanned<String>>,
    sticky_cookie: Option<Spanned<RawStickyCookie>>,
    retry: Option<Spanned<String>>,
    health: Option<Spanned<RawHealth>>,
    tls_ca: Option<Spanned<String>>,
    tls_verify: Option<Spanned<bool>>,
    #[serde(default, rename = "member")]
    members: Vec<RawMember>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    url: Spanned<String>,
    weight: Option<Spanned<i64>>,
    route: Option<Spanned<String>>,
    status: Option<Spanned<String>>,
    max_conns: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    check: String,
    path: Option<String>,
    expect_status: Option<u16>,
    interval: Option<String>,
    timeout: Option<String>,
    rise: Option<u32>,
    fall: Option<u32>,
    shutdown_sessions: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStickyCookie {
    name: String,
    path: Option<String>,
    secure: Option<bool>,
    http_only: Option<bool>,
    max_age: Option<String>,
}

/// Reads and validates a config file.
pub fn load_file(path: &std::path::Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| {
        ConfigErrors(vec![ConfigError {
            file: file.clone(),
            line: 0,
            message: format!("cannot read: {error}"),
        }])
    })?;
    parse(&file, &text)
}

/// Validates config text; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Config, ConfigErrors> {
    let mut checker = Checker {
        file,
        text,
        base: Path::new(file).parent().map(Path::to_path_buf),
        errors: Vec::new(),
    };
    let raw: RawConfig = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(error) => {
            let message = error.message().trim_end().to_string();
            checker.error(error.span().unwrap_or(0..0), message);
            return Err(ConfigErrors(checker.errors));
        }
    };
    let config = checker.validate(raw);
    if checker.errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(checker.errors))
    }
}

struct Checker<'a> {
    file: &'a str,
    text: &'a str,
    /// Relative certificate and CA paths are taken from the config file's directory.
    base: Option<PathBuf>,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let offset = span.start.min(self.text.len());
        let line = self.text[..offset].matches('\n').count() + 1;
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line,
            message: message.into(),
        });
    }

    fn validate(&mut self, raw: RawConfig) -> Config {
        let server = self.server(raw.server);
        let mut listeners = Vec::new();
        for listener in raw.listeners {
            let Ok(address) = listener.address.get_ref().parse::<SocketAddr>() else {
                self.error(
                    listener.address.span(),
                    format!(
                        "listener address {:?} is not IP:PORT",
                        listener.address.get_ref()
                    ),
                );
                continue;
            };
            let tls = listener.tls.and_then(|tls| self.listener_tls(tls));
            let redirect_to_https = listener.redirect_to_https.is_some_and(|redirect| {
                if *redirect.get_ref() && tls.is_some() {
                    self.error(
                        redirect.span(),
                        "redirect_to_https is for a plain listener; this one has tls",
                    );
                }
                *redirect.get_ref()
            });
            listeners.push(ListenerConfig {
                address,
                tls,
                redirect_to_https,
            });
        }
        if listeners.is_empty() {
            self.error(0..0, "no [[listener]]: nothing to serve on");
        }

        let mut clusters = Vec::new();
        let mut cluster_index = HashMap::new();
        for cluster in raw.clusters {
            let name = cluster.name.get_ref().clone();
            if cluster_index.insert(name.clone(), clusters.len()).is_some() {
                self.error(
                    cluster.name.span(),
                    format!("cluster {name:?} is defined twice"),
                );
            }
            let lbmethod = match &cluster.lbmethod {
                None => LbMethod::ByRequests,
                Some(text) => LbMethod::parse(text.get_ref()).unwrap_or_else(|message| {
                    self.error(text.span(), message);
                    LbMethod::ByRequests
                }),
            };
            if cluster.members.is_empty() {
                self.error(
                    cluster.name.span(),
                    format!("cluster {name:?} has no [[cluster.member]]"),
                );
            }
            let members = cluster
                .members
                .into_iter()
                .filter_map(|member| self.member(member))
                .collect();
            let member_tls = self.member_tls(cluster.tls_ca, cluster.tls_verify);
            let hash_key = match &cluster.hash_key {
                None => HashKey::ClientIp,
                Some(text) => HashKey::parse(text.get_ref()).unwrap_or_else(|message| {
                    self.error(text.span(), message);
                    HashKey::ClientIp
                }),
            };
            let sticky = cluster.stickysession.as_ref().and_then(|text| {
                let (cookie, parameter) = match text.get_ref().split_once('|') {
                    Some((cookie, parameter)) => (cookie, parameter),
                    None => (text.get_ref().as_str(), text.get_ref().as_str()),
                };
                let name = |part: &str| (!part.trim().is_empty()).then(|| part.trim().to_string());
                let sticky = StickySession {
                    cookie: name(cookie),
                    parameter: name(parameter),
                };
                if sticky.cookie.is_none() && sticky.parameter.is_none() {
                    self.error(
                        text.span(),
                        "stickysession needs a cookie or parameter name",
                    );
                    return None;
                }
                Some(sticky)
            });
            let sticky_cookie = cluster
                .sticky_cookie
                .and_then(|raw| self.sticky_cookie(raw));
            let retry = match &cluster.retry {
                None => Duration::from_secs(60),
                Some(text) => humantime::parse_duration(text.get_ref()).unwrap_or_else(|error| {
                    self.error(
                        text.span(),
                        format!("retry {:?}: {error} (e.g. \"60s\")", text.get_ref()),
                    );
                    Duration::from_secs(60)
                }),
            };
            let health = cluster.health.and_then(|raw| self.health(raw));
            let members: Vec<MemberConfig> = members;
            if (sticky.is_some() || sticky_cookie.is_some())
                && !members.iter().any(|m| m.route.is_some())
            {
                self.error(
                    cluster.name.span(),
                    format!("cluster {name:?} is sticky but no member has a route"),
                );
            }
            clusters.push(ClusterConfig {
                name,
                lbmethod,
                hash_key,
                sticky,
                sticky_cookie,
                retry,
                health,
                members,
                member_tls,
            });
        }

        let mut routes = Vec::new();
        for route in raw.routes {
            let Some(&cluster) = cluster_index.get(route.cluster.get_ref()) else {
                self.error(
                    route.cluster.span(),
                    format!("route names unknown cluster {:?}", route.cluster.get_ref()),
                );
                continue;
            };
            let path_prefix = match route.path {
                None => "/".to_string(),
                Some(path) if path.get_ref().starts_with('/') => path.into_inner(),
                Some(path) => {
                    self.error(
                        path.span(),
                        format!("route path {:?} must start with '/'", path.get_ref()),
                    );
                    continue;
                }
            };
            let host = route
                .host
                .map(|host| host.into_inner().to_ascii_lowercase());
            routes.push(Route {
                host,
                path_prefix,
                cluster,
            });
        }
        if routes.is_empty() && !clusters.is_empty() {
            self.error(0..0, "no [[route]]: no request can reach a cluster");
        }
        Config {
            server,
            listeners,
            routes,
            clusters,
        }
    }

    fn server(&mut self, raw: RawServer) -> ServerSettings {
        let mut settings = ServerSettings::default();
        if let Some(workers) = raw.workers {
            match usize::try_from(*workers.get_ref()) {
                Ok(n @ 1..=1024) => settings.workers = n,
                _ => self.error(workers.span(), "workers must be between 1 and 1024"),
            }
        }
        if let Some(mode) = raw.dataplane {
            match DataplaneMode::parse(mode.get_ref()) {
                Ok(mode) => settings.dataplane = mode,
                Err(message) => self.error(mode.span(), message),
            }
        }
        if let Some(size) = raw.max_buffered_per_direction {
            match size_value(size.get_ref()) {
                Ok(bytes) if bytes >= 256 * 1024 => settings.max_buffered_per_direction = bytes,
                Ok(_) => self.error(
                    size.span(),
                    "max_buffered_per_direction must be at least 256KiB",
                ),
                Err(message) => self.error(size.span(), message),
            }
        }
        for (raw, slot, name) in [
            (
                raw.handshake_timeout,
                &mut settings.handshake_timeout,
                "handshake_timeout",
            ),
            (
                raw.connect_timeout,
                &mut settings.connect_timeout,
                "connect_timeout",
            ),
        ] {
            if let Some(text) = raw {
                match humantime::parse_duration(text.get_ref()) {
                    Ok(duration) if !duration.is_zero() => *slot = duration,
                    Ok(_) => self.error(text.span(), format!("{name} must not be zero")),
                    Err(error) => self.error(
                        text.span(),
                        format!("{name} {:?}: {error} (e.g. \"10s\")", text.get_ref()),
                    ),
                }
            }
        }
        if let Some(size) = raw.max_header_bytes {
            match size_value(size.get_ref()) {
                Ok(bytes @ 8192..=1_048_576) => settings.max_header_bytes = bytes as usize,
                Ok(_) => self.error(size.span(), "max_header_bytes must be 8KiB..1MiB"),
                Err(message) => self.error(size.span(), message),
            }
        }
        if let Some(kernel_tls) = raw.kernel_tls {
            settings.kernel_tls = kernel_tls;
        }
        if let Some(text) = raw.idle_timeout {
            match humantime::parse_duration(text.get_ref()) {
                // "0s" keeps tunnels open however long they are quiet.
                Ok(duration) => settings.idle_timeout = (!duration.is_zero()).then_some(duration),
                Err(error) => self.error(
                    text.span(),
                    format!("idle_timeout {:?}: {error} (e.g. \"5m\")", text.get_ref()),
                ),
            }
        }
        if let Some(text) = raw.offload_after {
            match humantime::parse_duration(text.get_ref()) {
                // "0s": the kernel takes every pair at once.
                Ok(duration) if duration <= MAX_OFFLOAD_AFTER => {
                    settings.offload_after = (!duration.is_zero()).then_some(duration)
                }
                Ok(_) => self.error(text.span(), "offload_after must be at most 1m"),
                Err(error) => self.error(
                    text.span(),
                    format!("offload_after {:?}: {error} (e.g. \"1s\")", text.get_ref()),
                ),
            }
        }
        if let Some(count) = raw.max_headers {
            match usize::try_from(*count.get_ref()) {
                Ok(n @ 1..=1000) => settings.max_headers = n,
                _ => self.error(count.span(), "max_headers must be between 1 and 1000"),
            }
        }
        settings
    }

    fn member(&mut self, raw: RawMember) -> Option<MemberConfig> {
        let weight = match raw.weight {
            None => 1,
            Some(weight) => match u32::try_from(*weight.get_ref()) {
                Ok(n @ 1..=100) => n,
                _ => {
                    self.error(weight.span(), "member weight must be between 1 and 100");
                    return None;
                }
            },
        };
        let status = match &raw.status {
            None => MemberStatus::Active,
            Some(text) => match text.get_ref().as_str() {
                "active" => MemberStatus::Active,
                "standby" | "+H" => MemberStatus::Standby,
                "drain" | "+N" => MemberStatus::Drain,
                "disabled" | "+D" => MemberStatus::Disabled,
                other => {
                    self.error(
                        text.span(),
                        format!(
                            "member status {other:?}: expected active, standby (+H), drain (+N) \
                             or disabled (+D)"
                        ),
                    );
                    return None;
                }
            },
        };
        let route = match raw.route {
            Some(route)
                if !route.get_ref().is_empty()
                    && route
                        .get_ref()
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)) =>
            {
                Some(route.into_inner())
            }
            Some(route) => {
                self.error(route.span(), "route must be letters, digits, '-' or '_'");
                return None;
            }
            None => None,
        };
        let max_conns = match raw.max_conns {
            None => None,
            Some(max) => match u64::try_from(*max.get_ref()) {
                Ok(n @ 1..) => Some(n),
                _ => {
                    self.error(max.span(), "max_conns must be at least 1");
                    return None;
                }
            },
        };
        match MemberConfig::parse(raw.url.get_ref(), weight) {
            Ok(member) => Some(MemberConfig {
                route,
                status,
                max_conns,
                ..member
            }),
            Err(message) => {
                self.error(raw.url.span(), message);
                None
            }
        }
    }

    fn health(&mut self, raw: Spanned<RawHealth>) -> Option<HealthSettings> {
        let span = raw.span();
        let raw = raw.into_inner();
        let kind = match raw.check.as_str() {
            "tcp" => CheckKind::Tcp,
            "http" => CheckKind::Http,
            "websocket" => CheckKind::WebSocket,
            other => {
                self.error(
                    span,
                    format!("health check {other:?}: expected tcp, http or websocket"),
                );
                return None;
            }
        };
        let mut duration = |text: Option<String>, default: u64, name: &str| match text {
            None => Some(Duration::from_secs(default)),
            Some(text) => match humantime::parse_duration(&text) {
                Ok(value) if !value.is_zero() => Some(value),
                Ok(_) => {
                    self.error(span.clone(), format!("health {name} must not be zero"));
                    None
                }
                Err(error) => {
                    self.error(span.clone(), format!("health {name} {text:?}: {error}"));
                    None
                }
            },
        };
        let interval = duration(raw.interval, 2, "interval")?;
        let timeout = duration(raw.timeout, 1, "timeout")?;
        let path = raw.path.unwrap_or_else(|| "/".into());
        if !path.starts_with('/') || path.bytes().any(|b| !b.is_ascii_graphic()) {
            self.error(
                span,
                format!("health path {path:?} must start with / (no spaces)"),
            );
            return None;
        }
        let expect_status = raw.expect_status.unwrap_or(200);
        if !(100..=599).contains(&expect_status) {
            self.error(span, "health expect_status must be 100..599");
            return None;
        }
        let (rise, fall) = (raw.rise.unwrap_or(2), raw.fall.unwrap_or(3));
        if rise == 0 || fall == 0 {
            self.error(span, "health rise and fall must be at least 1");
            return None;
        }
        Some(HealthSettings {
            kind,
            path,
            expect_status,
            interval,
            timeout,
            rise,
            fall,
            shutdown_sessions: raw.shutdown_sessions.unwrap_or(false),
        })
    }

    fn sticky_cookie(&mut self, raw: Spanned<RawStickyCookie>) -> Option<StickyCookie> {
        let span = raw.span();
        let raw = raw.into_inner();
        let token = |text: &str| {
            !text.is_empty()
                && text
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b";,=\"\\".contains(&b))
        };
        if !token(&raw.name) {
            self.error(
                span,
                format!("sticky_cookie name {:?} is not a cookie name", raw.name),
            );
            return None;
        }
        let path = raw.path.unwrap_or_else(|| "/".into());
        if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic() && b != b';') {
            self.error(
                span,
                format!("sticky_cookie path {path:?} must start with /"),
            );
            return None;
        }
        let max_age = match raw.max_age {
            None => None,
            Some(text) => match humantime::parse_duration(&text) {
                Ok(age) => Some(age),
                Err(error) => {
                    self.error(span, format!("sticky_cookie max_age {text:?}: {error}"));
                    return None;
                }
            },
        };
        Some(StickyCookie {
            name: raw.name,
            path,
            secure: raw.secure.unwrap_or(false),
            http_only: raw.http_only.unwrap_or(true),
            max_age,
        })
    }

    fn path(&self, text: &str) -> PathBuf {
        let path = Path::new(text);
        match &self.base {
            Some(base) if path.is_relative() => base.join(path),
            _ => path.to_path_buf(),
        }
    }

    /// A listener's `tls = { cert, key, more_certificates, unknown_sni }`; every file is read
    /// now, so a bad one is reported at its line.
    fn listener_tls(&mut self, raw: Spanned<RawTls>) -> Option<ListenerTls> {
        let span = raw.span();
        let raw = raw.into_inner();
        let mut pairs = Vec::new();
        match (raw.cert, raw.key) {
            (Some(cert), Some(key)) => pairs.push((cert, key)),
            (None, None) => {}
            _ => {
                self.error(span.clone(), "tls needs both cert and key");
                return None;
            }
        }
        pairs.extend(raw.more_certificates.into_iter().map(|c| (c.cert, c.key)));
        if pairs.is_empty() {
            self.error(span, "tls needs cert and key (PEM files)");
            return None;
        }
        let unknown_sni = match raw.unknown_sni {
            None => UnknownSni::Default,
            Some(text) => match text.get_ref().as_str() {
                "default" => UnknownSni::Default,
                "reject" => UnknownSni::Reject,
                other => {
                    self.error(
                        text.span(),
                        format!("unknown_sni {other:?}: expected \"default\" or \"reject\""),
                    );
                    UnknownSni::Default
                }
            },
        };
        let mut certificates = Vec::new();
        for (cert, key) in pairs {
            let files = CertificateFiles {
                cert: self.path(cert.get_ref()),
                key: self.path(key.get_ref()),
            };
            match crate::tls::load_certified_key(&files) {
                Ok(_) => certificates.push(files),
                Err(message) => self.error(cert.span(), message),
            }
        }
        (!certificates.is_empty()).then_some(ListenerTls {
            certificates,
            unknown_sni,
        })
    }

    fn member_tls(
        &mut self,
        ca: Option<Spanned<String>>,
        verify: Option<Spanned<bool>>,
    ) -> MemberTlsSettings {
        let mut settings = MemberTlsSettings::default();
        if let Some(verify) = &verify {
            settings.verify = *verify.get_ref();
        }
        if let Some(ca) = ca {
            if !settings.verify {
                self.error(
                    ca.span(),
                    "tls_ca is pointless with tls_verify = false; keep one of them",
                );
            }
            let path = self.path(ca.get_ref());
            match crate::tls::roots_from_file(&path) {
                Ok(_) => settings.ca_file = Some(path),
                Err(message) => self.error(ca.span(), message),
            }
        }
        settings
    }
}

/// The quick form: one listener, one cluster, every path routed to it.
#[derive(Debug, Clone, Default)]
pub struct QuickForm {
    pub listen: String,
    pub members: Vec<String>,
    pub lbmethod: Option<String>,
    /// wss:// on the listener: a PEM certificate chain and its key.
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
}

/// Builds a config from the quick form's flags, with the same checks as a file.
pub fn quick(form: &QuickForm) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let mut fail = |message: String| {
        errors.push(ConfigError {
            file: "command line".into(),
            line: 0,
            message,
        })
    };
    let tls = match (&form.tls_cert, &form.tls_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            let files = CertificateFiles {
                cert: cert.into(),
                key: key.into(),
            };
            match crate::tls::load_certified_key(&files) {
                Ok(_) => Some(ListenerTls {
                    certificates: vec![files],
                    unknown_sni: UnknownSni::Default,
                }),
                Err(message) => {
                    fail(format!("--tls-cert/--tls-key: {message}"));
                    None
                }
            }
        }
        _ => {
            fail("--tls-cert and --tls-key go together".into());
            None
        }
    };
    let listeners = match form.listen.parse::<SocketAddr>() {
        Ok(address) => vec![ListenerConfig {
            address,
            tls,
            redirect_to_https: false,
        }],
        Err(_) => {
            fail(format!("--listen {:?} is not IP:PORT", form.listen));
            Vec::new()
        }
    };
    if form.members.is_empty() {
        fail("at least one --member ws://HOST:PORT is needed".into());
    }
    let members = form
        .members
        .iter()
        .filter_map(|url| match MemberConfig::parse(url, 1) {
            Ok(member) => Some(member),
            Err(message) => {
                fail(message);
                None
            }
        })
        .collect();
    let lbmethod = match form.lbmethod.as_deref().map(LbMethod::parse) {
        None => LbMethod::ByRequests,
        Some(Ok(method)) => method,
        Some(Err(message)) => {
            fail(message);
            LbMethod::ByRequests
        }
    };
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Config {
        server: ServerSettings::default(),
        listeners,
        routes: vec![Route {
            host: None,
            path_prefix: "/".into(),
            cluster: 0,
        }],
        clusters: vec![ClusterConfig {
            name: "default".into(),
            lbmethod,
            hash_key: HashKey::ClientIp,
            sticky: None,
            sticky_cookie: None,
            retry: Duration::from_secs(60),
            health: None,
            members,
            member_tls: MemberTlsSettings::default(),
        }],
    })
}

impl MemberConfig {
    /// A member from its url, `ws://` or `wss://HOST[:PORT][/]`, resolved once, at load time.
    pub fn parse(url: &str, weight: u32) -> Result<Self, String> {
        let (address, tls, host) = member_address(url)?;
        Ok(MemberConfig {
            url: url.to_string(),
            address,
            weight,
            tls,
            host,
            route: None,
            status: MemberStatus::Active,
            max_conns: None,
        })
    }
}

/// Parses `ws[s]://host[:port][/]` and resolves it once; returns the address, whether it is
/// wss://, and the host (what a wss:// member's certificate must name).
pub fn member_address(url: &str) -> Result<(SocketAddr, bool, String), String> {
    let (rest, tls, default_port) = if let Some(rest) = url.strip_prefix("ws://") {
        (rest, false, 80)
    } else if let Some(rest) = url.strip_prefix("wss://") {
        (rest, true, 443)
    } else {
        return Err(format!(
            "member {url:?}: expected ws://HOST:PORT or wss://HOST:PORT"
        ));
    };
    let authority = match rest.find('/') {
        None => rest,
        Some(slash) if &rest[slash..] == "/" => &rest[..slash],
        Some(_) => {
            return Err(format!(
                "member {url:?}: a member url has no path; the request path is forwarded as it is"
            ));
        }
    };
    let with_port = if authority.rsplit_once(':').is_some_and(|(host, port)| {
        !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':')
    }) {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    };
    let host = with_port
        .rsplit_once(':')
        .map_or(with_port.as_str(), |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if tls && let Err(message) = crate::tls::member_server_name(&host) {
        return Err(format!("member {url:?}: not a TLS server name: {message}"));
    }
    let address = with_port
        .to_socket_addrs()
        .map_err(|error| format!("member {url:?}: cannot resolve {host:?}: {error}"))?
        .next()
        .ok_or_else(|| format!("member {url:?}: {host:?} resolves to no address"))?;
    Ok((address, tls, host))
}

fn size_value(raw: &RawSize) -> Result<u64, String> {
    match raw {
        RawSize::Bytes(n) => {
            u64::try_from(*n).map_err(|_| format!("size {n} must not be negative"))
        }
        RawSize::Text(text) => parse_size(text),
    }
}

/// `4194304`, `512KiB`, `4MiB`, `1GiB` (K/M/G and KB/MB/GB are taken as powers of 1024 too).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("size {text:?}: expected a number with an optional unit"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("size {text:?}: unknown unit {other:?}")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
workers = 2
dataplane = "userspace"
max_buffered_per_direction = "2MiB"
handshake_timeout = "5s"

[[listener]]
address = "127.0.0.1:8080"

[[route]]
host = "Chat.Example.com"
path = "/ws"
cluster = "websocketcluster"

[[cluster]]
name = "websocketcluster"
lbmethod = "least-conn"
[[cluster.member]]
url = "ws://127.0.0.1:3001"
[[cluster.member]]
url = "ws://127.0.0.1:3002/"
weight = 3
"#;

    #[test]
    fn a_full_config_validates() {
        let config = parse("good.toml", GOOD).unwrap();
        assert_eq!(config.server.workers, 2);
        assert_eq!(config.server.dataplane, DataplaneMode::Userspace);
        assert_eq!(config.server.max_buffered_per_direction, 2 << 20);
        assert_eq!(config.server.handshake_timeout, Duration::from_secs(5));
        assert_eq!(config.routes[0].host.as_deref(), Some("chat.example.com"));
        assert_eq!(config.clusters[0].lbmethod, LbMethod::LeastConn);
        assert_eq!(config.clusters[0].members[1].weight, 3);
        assert_eq!(
            config.clusters[0].members[1].address,
            "127.0.0.1:3002".parse().unwrap()
        );
    }

    #[test]
    fn an_unknown_key_names_its_line() {
        let text = GOOD.replace("weight = 3", "wieght = 3");
        let errors = parse("bad.toml", &text).unwrap_err();
        assert_eq!(errors.0.len(), 1);
        let line = text.lines().position(|l| l.contains("wieght")).unwrap() + 1;
        assert_eq!(errors.0[0].line, line, "{errors}");
        assert!(errors.0[0].message.contains("wieght"), "{errors}");
        assert!(
            errors
                .to_string()
                .starts_with(&format!("bad.toml:{line}: "))
        );
    }

    #[test]
    fn bad_values_are_all_reported_with_lines() {
        let text = GOOD
            .replace("\"least-conn\"", "\"random\"")
            .replace("ws://127.0.0.1:3001", "http://127.0.0.1:3001")
            .replace("cluster = \"websocketcluster\"", "cluster = \"nope\"");
        let errors = parse("bad.toml", &text).unwrap_err();
        let lines: Vec<usize> = errors.0.iter().map(|e| e.line).collect();
        let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
        assert!(lines.contains(&line_of("\"random\"")), "{errors}");
        assert!(lines.contains(&line_of("http://")), "{errors}");
        assert!(lines.contains(&line_of("\"nope\"")), "{errors}");
    }

    /// The seed's balancer: routes, sticky sessions, a hot standby.
    const STICKY: &str = r#"
[[listener]]
address = "127.0.0.1:8080"
[[route]]
path = "/ws"
cluster = "websocketcluster"
[[cluster]]
name = "websocketcluster"
lbmethod = "byrequests"
stickysession = "SESSIONID|jsessionid"
sticky_cookie = { name = "ROUTEID", path = "/ws", secure = true, max_age = "2h" }
retry = "30s"
[[cluster.member]]
url = "ws://127.0.0.1:3001"
route = "server1"
[[cluster.member]]
url = "ws://127.0.0.1:3002"
route = "server2"
max_conns = 5000
[[cluster.member]]
url = "ws://127.0.0.1:3003"
route = "server3"
status = "+H"
"#;

    #[test]
    fn balancing_keys_are_read() {
        let config = parse("sticky.toml", STICKY).unwrap();
        let cluster = &config.clusters[0];
        assert_eq!(
            cluster.sticky,
            Some(StickySession {
                cookie: Some("SESSIONID".into()),
                parameter: Some("jsessionid".into()),
            })
        );
        let cookie = cluster.sticky_cookie.as_ref().unwrap();
        assert_eq!(
            (
                cookie.name.as_str(),
                cookie.path.as_str(),
                cookie.secure,
                cookie.http_only
            ),
            ("ROUTEID", "/ws", true, true)
        );
        assert_eq!(cookie.max_age, Some(Duration::from_secs(7200)));
        assert_eq!(cluster.retry, Duration::from_secs(30));
        assert_eq!(cluster.members[1].route.as_deref(), Some("server2"));
        assert_eq!(cluster.members[1].max_conns, Some(5000));
        assert_eq!(cluster.members[2].status, MemberStatus::Standby);
        let hashed = STICKY.replace(
            "lbmethod = \"byrequests\"",
            "lbmethod = \"hash\"\nhash_key = \"cookie:uid\"",
        );
        let config = parse("hash.toml", &hashed).unwrap();
        assert_eq!(config.clusters[0].lbmethod, LbMethod::Hash);
        assert_eq!(config.clusters[0].hash_key, HashKey::Cookie("uid".into()));
    }

    #[test]
    fn bad_balancing_keys_name_their_lines() {
        let text = STICKY
            .replace("\"+H\"", "\"+X\"")
            .replace("max_conns = 5000", "max_conns = 0")
            .replace("route = \"server1\"", "route = \"server 1\"")
            .replace("retry = \"30s\"", "retry = \"soon\"")
            .replace(
                "lbmethod = \"byrequests\"",
                "lbmethod = \"hash\"\nhash_key = \"ip\"",
            );
        let errors = parse("bad.toml", &text).unwrap_err();
        let lines: Vec<usize> = errors.0.iter().map(|e| e.line).collect();
        let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
        for needle in ["+X", "max_conns = 0", "server 1", "soon", "hash_key"] {
            assert!(lines.contains(&line_of(needle)), "{needle}: {errors}");
        }
        // Sticky with no route anywhere is a mistake worth a line.
        let routeless = STICKY.replace("route = \"server", "# route = \"server");
        let errors = parse("routeless.toml", &routeless).unwrap_err();
        assert!(
            errors.to_string().contains("no member has a route"),
            "{errors}"
        );
    }

    #[test]
    fn offload_after_is_read_and_bounded() {
        let base = "[[listener]]\naddress = \"127.0.0.1:0\"\n[[cluster]]\nname = \"c\"\n\
                    [[cluster.member]]\nurl = \"ws://127.0.0.1:1\"\n[[route]]\ncluster = \"c\"\n";
        let with = |value: &str| format!("[server]\noffload_after = \"{value}\"\n{base}");
        let parsed = |value: &str| parse("t.toml", &with(value)).map(|c| c.server.offload_after);
        assert_eq!(
            parse("t.toml", base).unwrap().server.offload_after,
            Some(DEFAULT_OFFLOAD_AFTER)
        );
        assert_eq!(parsed("250ms").unwrap(), Some(Duration::from_millis(250)));
        assert_eq!(
            parsed("0s").unwrap(),
            None,
            "0s: the kernel takes pairs at once"
        );
        for bad in ["2m", "soon"] {
            let errors = parsed(bad).unwrap_err();
            assert_eq!(errors.0[0].line, 2, "{bad}: {errors}");
            assert!(errors.to_string().contains("offload_after"), "{errors}");
        }
    }

    #[test]
    fn a_syntax_error_names_its_line() {
        let errors = parse("x.toml", "[server]\nworkers = = 2\n").unwrap_err();
        assert_eq!(errors.0[0].line, 2, "{errors}");
    }

    #[test]
    fn the_quick_form_is_checked_like_a_file() {
        let form = QuickForm {
            listen: "127.0.0.1:0".into(),
            members: vec!["ws://127.0.0.1:1".into(), "ws://127.0.0.1:2".into()],
            lbmethod: Some("least-conn".into()),
            ..Default::default()
        };
        let config = quick(&form).unwrap();
        assert_eq!(config.clusters[0].members.len(), 2);
        assert_eq!(config.clusters[0].lbmethod, LbMethod::LeastConn);
        let bad = QuickForm {
            listen: "nowhere".into(),
            members: vec!["http://x".into()],
            lbmethod: Some("fastest".into()),
            tls_cert: Some("cert.pem".into()),
            tls_key: None,
        };
        let errors = quick(&bad).unwrap_err();
        assert_eq!(errors.0.len(), 4, "{errors}");
        assert!(
            errors
                .to_string()
                .contains("--tls-cert and --tls-key go together")
        );
        assert!(errors.to_string().starts_with("command line: "));
    }

    #[test]
    fn tls_settings_are_checked_with_their_lines() {
        let text = r#"
[[listener]]
address = "127.0.0.1:8443"
tls = { cert = "/nonexistent/cert.pem", key = "/nonexistent/key.pem" }

[[listener]]
address = "127.0.0.1:8444"
tls = { cert = "/nonexistent/cert.pem" }

[[listener]]
address = "127.0.0.1:8445"
tls = { cert = "a", key = "b", unknown_sni = "sometimes" }

[[route]]
cluster = "c"

[[cluster]]
name = "c"
tls_ca = "/nonexistent/ca.pem"
[[cluster.member]]
url = "wss://localhost:3000"
"#;
        let errors = parse("t.toml", text).unwrap_err().to_string();
        assert!(
            errors.contains("t.toml:4: certificate /nonexistent/cert.pem"),
            "{errors}"
        );
        assert!(
            errors.contains("t.toml:8: tls needs both cert and key"),
            "{errors}"
        );
        assert!(
            errors.contains("t.toml:12: unknown_sni \"sometimes\""),
            "{errors}"
        );
        assert!(
            errors.contains("t.toml:19: CA file /nonexistent/ca.pem"),
            "{errors}"
        );
    }

    #[test]
    fn a_wss_member_is_verified_unless_the_config_says_not_to() {
        let text = r#"
[[listener]]
address = "127.0.0.1:8080"
redirect_to_https = true
[[route]]
cluster = "c"
[[cluster]]
name = "c"
tls_verify = false
[[cluster.member]]
url = "wss://localhost:3000"
"#;
        let config = parse("t.toml", text).unwrap();
        assert!(config.listeners[0].redirect_to_https);
        let member = &config.clusters[0].members[0];
        assert!(member.tls);
        assert_eq!(member.host, "localhost");
        assert!(!config.clusters[0].member_tls.verify);
        let verified = parse("t.toml", &text.replace("tls_verify = false\n", "")).unwrap();
        assert!(verified.clusters[0].member_tls.verify);
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_size("512k").unwrap(), 512 << 10);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("4 parsecs").is_err());
    }

    #[test]
    fn member_urls_are_checked() {
        assert!(member_address("ws://127.0.0.1:9").is_ok());
        assert!(member_address("ws://127.0.0.1:9/chat").is_err());
        assert!(member_address("http://127.0.0.1:9").is_err());
        let (address, tls, host) = member_address("wss://localhost").unwrap();
        assert_eq!(
            (address.port(), tls, host.as_str()),
            (443, true, "localhost")
        );
        assert_eq!(
            member_address("ws://[::1]:9").unwrap(),
            ("[::1]:9".parse().unwrap(), false, "::1".to_string())
        );
    }
}
