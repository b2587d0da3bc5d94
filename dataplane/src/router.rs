//! Request routing: Host and path prefix -> cluster, in config order, first match wins.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::balancer::{Balancer, SharedBalancer};
use crate::config::{Config, LbMethod};

#[derive(Debug)]
pub struct Member {
    pub url: String,
    pub address: SocketAddr,
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
    pub fn new(config: &Config) -> Self {
        let clusters = config
            .clusters
            .iter()
            .map(|cluster| {
                let weights: Vec<u32> = cluster.members.iter().map(|m| m.weight).collect();
                Cluster {
                    name: cluster.name.clone(),
                    lbmethod: cluster.lbmethod,
                    members: cluster
                        .members
                        .iter()
                        .map(|m| Member {
                            url: m.url.clone(),
                            address: m.address,
                        })
                        .collect(),
                    balancer: Arc::new(Mutex::new(Balancer::new(cluster.lbmethod, &weights))),
                }
            })
            .collect();
        let routes = config
            .routes
            .iter()
            .map(|route| RouteEntry {
                host: route.host.clone(),
                path_prefix: route.path_prefix.clone(),
                cluster: route.cluster,
            })
            .collect();
        Router { routes, clusters }
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

fn host_without_port(host: &str) -> &str {
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
        Router::new(&crate::config::parse("t.toml", text).unwrap())
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
        let router = Router::new(&crate::config::parse("t.toml", text).unwrap());
        assert!(router.route(Some("x"), "/other").is_none());
        assert_eq!(host_without_port("[::1]:80"), "::1");
    }
}
