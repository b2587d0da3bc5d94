//! Request routing: Host and path prefix -> cluster, in config order, first match wins.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::balancer::{Balancer, SharedBalancer};
use crate::config::{Config, LbMethod};

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
    routes: Vec<RouteEntry>,
    pub clusters: Vec<Cluster>,
}

impl Router {
    /// Fails when a cluster's member TLS settings cannot be built (a CA file gone since the
    /// config was checked).
    pub fn new(config: &Config) -> Result<Self, String> {
        let mut clusters = Vec::new();
        for cluster in &config.clusters {
            let weights: Vec<u32> = cluster.members.iter().map(|m| m.weight).collect();
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
            clusters.push(Cluster {
                name: cluster.name.clone(),
                lbmethod: cluster.lbmethod,
                members,
                balancer: Arc::new(Mutex::new(Balancer::new(cluster.lbmethod, &weights))),
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
        Ok(Router { routes, clusters })
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
