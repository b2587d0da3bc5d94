//! Config pipeline: TOML text -> [`RawConfig`] (serde, unknown keys rejected) -> validated
//! [`Config`]. One validation path serves `wsplice check`, `wsplice run` and the quick form.
//! Every error names `file:line`.

use std::collections::HashMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// Default bound on bytes held per connection per direction (kernel + wsplice).
pub const DEFAULT_MAX_BUFFERED: u64 = 4 << 20;

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
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataplaneMode {
    /// sockmap where the kernel allows it, userspace relay otherwise.
    Auto,
    Sockmap,
    Userspace,
}

impl DataplaneMode {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(DataplaneMode::Auto),
            "sockmap" => Ok(DataplaneMode::Sockmap),
            "userspace" => Ok(DataplaneMode::Userspace),
            other => Err(format!(
                "unknown dataplane {other:?} (expected auto, sockmap or userspace)"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbMethod {
    /// Weighted round robin with Apache's lbfactor/lbstatus semantics.
    ByRequests,
    /// Fewest live tunnels relative to weight.
    LeastConn,
}

impl LbMethod {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "byrequests" => Ok(LbMethod::ByRequests),
            "least-conn" | "leastconn" => Ok(LbMethod::LeastConn),
            other => Err(format!(
                "unknown lbmethod {other:?} (expected byrequests or least-conn)"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub address: SocketAddr,
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
    pub members: Vec<MemberConfig>,
}

#[derive(Debug, Clone)]
pub struct MemberConfig {
    pub url: String,
    pub address: SocketAddr,
    pub weight: u32,
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
    #[serde(default, rename = "member")]
    members: Vec<RawMember>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    url: Spanned<String>,
    weight: Option<Spanned<i64>>,
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
            match listener.address.get_ref().parse::<SocketAddr>() {
                Ok(address) => listeners.push(ListenerConfig { address }),
                Err(_) => self.error(
                    listener.address.span(),
                    format!(
                        "listener address {:?} is not IP:PORT",
                        listener.address.get_ref()
                    ),
                ),
            }
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
            clusters.push(ClusterConfig {
                name,
                lbmethod,
                members,
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
        match member_address(raw.url.get_ref()) {
            Ok(address) => Some(MemberConfig {
                url: raw.url.into_inner(),
                address,
                weight,
            }),
            Err(message) => {
                self.error(raw.url.span(), message);
                None
            }
        }
    }
}

/// The quick form: one listener, one cluster, every path routed to it.
#[derive(Debug, Clone, Default)]
pub struct QuickForm {
    pub listen: String,
    pub members: Vec<String>,
    pub lbmethod: Option<String>,
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
    let listeners = match form.listen.parse::<SocketAddr>() {
        Ok(address) => vec![ListenerConfig { address }],
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
        .filter_map(|url| match member_address(url) {
            Ok(address) => Some(MemberConfig {
                url: url.clone(),
                address,
                weight: 1,
            }),
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
            members,
        }],
    })
}

/// Parses `ws://host:port[/]` and resolves it once, at load time.
pub fn member_address(url: &str) -> Result<SocketAddr, String> {
    let Some(rest) = url.strip_prefix("ws://") else {
        return Err(if url.starts_with("wss://") {
            format!("member {url:?}: wss:// members are not supported yet; use ws://")
        } else {
            format!("member {url:?}: expected ws://HOST:PORT")
        });
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
        format!("{authority}:80")
    };
    let host = with_port.trim_start_matches('[');
    with_port
        .to_socket_addrs()
        .map_err(|error| format!("member {url:?}: cannot resolve {host:?}: {error}"))?
        .next()
        .ok_or_else(|| format!("member {url:?}: {host:?} resolves to no address"))
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
        };
        let config = quick(&form).unwrap();
        assert_eq!(config.clusters[0].members.len(), 2);
        assert_eq!(config.clusters[0].lbmethod, LbMethod::LeastConn);
        let bad = QuickForm {
            listen: "nowhere".into(),
            members: vec!["http://x".into()],
            lbmethod: Some("fastest".into()),
        };
        let errors = quick(&bad).unwrap_err();
        assert_eq!(errors.0.len(), 3, "{errors}");
        assert!(errors.to_string().starts_with("command line: "));
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
        assert!(
            member_address("wss://127.0.0.1:9")
                .unwrap_err()
                .contains("wss://")
        );
        assert_eq!(
            member_address("ws://[::1]:9").unwrap(),
            "[::1]:9".parse().unwrap()
        );
    }
}
