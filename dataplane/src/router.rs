//! Request routing: Host and path prefix -> cluster, in config order, first match wins.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::balancer::{Balancer, MemberSpec, SharedBalancer};
use crate::config::{Config, HashKey, LbMethod, StickyCookie, StickySession};

#[derive(Debug)]
pub struct Member {
    pub url: String,
    pub address: SocketAddr,
    /// wss://: the cluster's TLS client and the name the certificate must carry.
    pub tls: Option<MemberTls>,
}

#[derive(Clone)]
pub struct MemberTls {
    pub connector: tokio_rustls::TlsConnector,
    /// The connector's configuration, for handshakes that end in kernel TLS.
    pub config: std::sync::Arc<rustls::ClientConfig>,
    pub server_name: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for MemberTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub lbmethod: LbMethod,
    pub hash_key: HashKey,
    pub sticky: Option<StickySession>,
    pub sticky_cookie: Option<StickyCookie>,
    pub retry: std::time::Duration,
    pub health: Option<crate::config::HealthSettings>,
    pub members: Vec<Member>,
    pub balancer: SharedBalancer,
}

#[derive(Debug)]
struct RouteEntry {
    host: Option<String>,
    path_prefix: String,
    cluster: usize,
}

#[derive(Debug)]
pub struct Router {
    /// The balancers' clock starts here.
    epoch: std::time::Instant,
    routes: Vec<RouteEntry>,
    pub clusters: Vec<Cluster>,
}

impl Router {
    /// Fails when a cluster's member TLS settings cannot be built (a CA file gone since the
    /// config was checked).
    pub fn new(config: &Config) -> Result<Self, String> {
        let mut clusters = Vec::new();
        for cluster in &config.clusters {
            let connector = if cluster.members.iter().any(|m| m.tls) {
                let config = crate::tls::client_config(&cluster.member_tls)
                    .map_err(|error| format!("cluster {}: {error}", cluster.name))?;
                Some((
                    tokio_rustls::TlsConnector::from(std::sync::Arc::clone(&config)),
                    config,
                ))
            } else {
                None
            };
            let mut members = Vec::new();
            for member in &cluster.members {
                let tls = match (&connector, member.tls) {
                    (Some((connector, config)), true) => Some(MemberTls {
                        connector: connector.clone(),
                        config: std::sync::Arc::clone(config),
                        server_name: crate::tls::member_server_name(&member.host)?,
                    }),
                    _ => None,
                };
                members.push(Member {
                    url: member.url.clone(),
                    address: member.address,
                    tls,
                });
            }
            let specs = cluster
                .members
                .iter()
                .map(|member| MemberSpec {
                    key: crate::balancer::stable_hash(member.url.as_bytes()),
                    weight: member.weight,
                    status: member.status,
                    route: member.route.clone(),
                    max_conns: member.max_conns,
                })
                .collect();
            let retry_ms = u64::try_from(cluster.retry.as_millis()).unwrap_or(u64::MAX);
            clusters.push(Cluster {
                name: cluster.name.clone(),
                lbmethod: cluster.lbmethod,
                hash_key: cluster.hash_key.clone(),
                sticky: cluster.sticky.clone(),
                sticky_cookie: cluster.sticky_cookie.clone(),
                retry: cluster.retry,
                health: cluster.health.clone(),
                members,
                balancer: Arc::new(Mutex::new({
                    let mut balancer = Balancer::new(cluster.lbmethod, specs, retry_ms);
                    balancer.shutdown_sessions =
                        cluster.health.as_ref().is_some_and(|h| h.shutdown_sessions);
                    balancer
                })),
            });
        }
        let routes = config
            .routes
            .iter()
            .map(|route| RouteEntry {
                host: route.host.clone(),
                path_prefix: route.path_prefix.clone(),
                cluster: route.cluster,
            })
            .collect();
        Ok(Router {
            epoch: std::time::Instant::now(),
            routes,
            clusters,
        })
    }

    /// Milliseconds since start: the time balancers are given.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The cluster for a request, given its Host header (port allowed) and path.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Cluster> {
        let host = host.map(|h| host_without_port(h).to_ascii_lowercase());
        self.routes
            .iter()
            .find(|route| {
                let host_matches = match (&route.host, &host) {
                    (None, _) => true,
                    (Some(wanted), Some(host)) => wanted == host,
                    (Some(_), None) => false,
                };
                host_matches && path_has_prefix(path, &route.path_prefix)
            })
            .map(|route| &self.clusters[route.cluster])
    }
}

pub fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host.split_once(']').map_or(host, |(v6, _)| &v6[1..]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// `/ws` matches `/ws`, `/ws/chat` and `/ws?x`, not `/wsx`.
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    let prefix = prefix.trim_end_matches('/');
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
}

/// The route a request names for `sticky`: from its cookie, else its URL parameter; a value
/// `session.route` names `route` (Apache's form), a value without a dot is the route itself.
pub fn sticky_route(
    sticky: &StickySession,
    cookies: &[&str],
    query: Option<&str>,
) -> Option<String> {
    let route_of = |value: &str| {
        let route = value.split_once('.').map_or(value, |(_, route)| route);
        (!route.is_empty()).then(|| route.to_string())
    };
    let from_cookie = sticky
        .cookie
        .as_deref()
        .and_then(|name| cookie_value(cookies, name).and_then(route_of));
    from_cookie.or_else(|| {
        let name = sticky.parameter.as_deref()?;
        query?
            .split(['&', ';'])
            .filter_map(|pair| pair.split_once('='))
            .find(|(key, _)| *key == name)
            .and_then(|(_, value)| route_of(value))
    })
}

/// The value of cookie `name` among `Cookie` header values.
pub fn cookie_value<'a>(cookies: &[&'a str], name: &str) -> Option<&'a str> {
    cookies
        .iter()
        .flat_map(|header| header.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim_matches('"'))
}

/// The hashed key of consistent hashing; None when the request lacks it (spread instead).
pub fn hash_of(
    key: &HashKey,
    client: std::net::IpAddr,
    header: impl Fn(&str) -> Option<String>,
    cookies: &[&str],
) -> Option<u64> {
    use crate::balancer::stable_hash;
    match key {
        HashKey::ClientIp => Some(stable_hash(client.to_string().as_bytes())),
        HashKey::Header(name) => header(name).map(|value| stable_hash(value.as_bytes())),
        HashKey::Cookie(name) => cookie_value(cookies, name).map(|v| stable_hash(v.as_bytes())),
    }
}

/// The `Set-Cookie` value that makes a client sticky to `route` (Apache's `.route` form).
pub fn route_cookie(cookie: &StickyCookie, route: &str) -> String {
    let mut value = format!("{}=.{route}; Path={}", cookie.name, cookie.path);
    if let Some(age) = cookie.max_age {
        value.push_str(&format!("; Max-Age={}", age.as_secs()));
    }
    if cookie.secure {
        value.push_str("; Secure");
    }
    if cookie.http_only {
        value.push_str("; HttpOnly");
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let text = r#"
[[listener]]
address = "127.0.0.1:1"
[[route]]
host = "chat.example.com"
path = "/ws"
cluster = "chat"
[[route]]
path = "/"
cluster = "web"
[[cluster]]
name = "chat"
[[cluster.member]]
url = "ws://127.0.0.1:3001"
[[cluster]]
name = "web"
[[cluster.member]]
url = "ws://127.0.0.1:3002"
"#;
        Router::new(&crate::config::parse("t.toml", text).unwrap()).unwrap()
    }

    #[test]
    fn sticky_routes_come_from_the_cookie_then_the_parameter() {
        let sticky = StickySession {
            cookie: Some("JSESSIONID".into()),
            parameter: Some("jsessionid".into()),
        };
        let route = |cookies: &[&str], query| sticky_route(&sticky, cookies, query);
        assert_eq!(
            route(&["a=1; JSESSIONID=abc.server2"], None).as_deref(),
            Some("server2")
        );
        assert_eq!(
            route(&["JSESSIONID=server3"], None).as_deref(),
            Some("server3")
        );
        assert_eq!(
            route(&["JSESSIONID=.server1"], Some("jsessionid=x.server2")).as_deref(),
            Some("server1")
        );
        assert_eq!(
            route(&[], Some("a=b&jsessionid=x.server2")).as_deref(),
            Some("server2")
        );
        assert_eq!(route(&["JSESSIONID=abc."], None), None);
        assert_eq!(route(&["OTHER=x.server1"], Some("x=1")), None);
    }

    #[test]
    fn hash_keys_and_route_cookies() {
        let ip: std::net::IpAddr = "192.0.2.7".parse().unwrap();
        let none = |_: &str| None;
        let by_ip = hash_of(&HashKey::ClientIp, ip, none, &[]);
        assert_eq!(by_ip, hash_of(&HashKey::ClientIp, ip, none, &[]));
        assert_ne!(
            by_ip,
            hash_of(&HashKey::ClientIp, "192.0.2.8".parse().unwrap(), none, &[])
        );
        assert_eq!(
            hash_of(&HashKey::Header("x-user".into()), ip, none, &[]),
            None
        );
        assert!(hash_of(&HashKey::Cookie("uid".into()), ip, none, &["uid=42"]).is_some());
        let cookie = StickyCookie {
            name: "ROUTEID".into(),
            path: "/ws".into(),
            secure: true,
            http_only: true,
            max_age: Some(std::time::Duration::from_secs(60)),
        };
        assert_eq!(
            route_cookie(&cookie, "server1"),
            "ROUTEID=.server1; Path=/ws; Max-Age=60; Secure; HttpOnly"
        );
    }

    #[test]
    fn host_and_prefix_pick_the_cluster() {
        let router = router();
        let name = |host, path| router.route(host, path).map(|c| c.name.as_str());
        assert_eq!(name(Some("chat.example.com"), "/ws"), Some("chat"));
        assert_eq!(
            name(Some("CHAT.example.com:8080"), "/ws/room?id=1"),
            Some("chat")
        );
        assert_eq!(name(Some("chat.example.com"), "/wsx"), Some("web"));
        assert_eq!(name(Some("other.example.com"), "/ws"), Some("web"));
        assert_eq!(name(None, "/ws"), Some("web"));
    }

    #[test]
    fn no_route_means_none() {
        let text = r#"
[[listener]]
address = "127.0.0.1:1"
[[route]]
path = "/ws"
cluster = "c"
[[cluster]]
name = "c"
[[cluster.member]]
url = "ws://127.0.0.1:3001"
"#;
        let router = Router::new(&crate::config::parse("t.toml", text).unwrap()).unwrap();
        assert!(router.route(Some("x"), "/other").is_none());
        assert_eq!(host_without_port("[::1]:80"), "::1");
    }
}
