//! Active health checks: every `interval` each member of a cluster with `health` is checked
//! (a TCP connect, an HTTP GET expecting a status, or a real WebSocket upgrade) within
//! `timeout`; `fall` failures in a row mark an up member down, `rise` passes in a row mark it
//! up again. The counting is a sans-io core; the checks run on a thread of their own.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::config::{CheckKind, HealthSettings};
use crate::router::{Cluster, Member, Router};

/// Rise/fall counting for one member; members start up.
#[derive(Debug, Clone)]
pub struct MemberHealth {
    up: bool,
    /// Results in a row that disagree with `up`.
    streak: u32,
}

impl Default for MemberHealth {
    fn default() -> Self {
        MemberHealth {
            up: true,
            streak: 0,
        }
    }
}

impl MemberHealth {
    /// Counts one check; returns the new state when this result flips the member.
    pub fn observe(&mut self, passed: bool, rise: u32, fall: u32) -> Option<bool> {
        if passed == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { fall } else { rise };
        if self.streak < needed.max(1) {
            return None;
        }
        self.up = passed;
        self.streak = 0;
        Some(self.up)
    }
}

/// Starts the checks of every cluster that has `health`, on one thread, until `stop`.
pub fn spawn(router: Arc<Router>, stop: watch::Receiver<bool>) -> std::io::Result<()> {
    if router
        .clusters
        .iter()
        .all(|cluster| cluster.health.is_none())
    {
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("wsplice-health".into())
        .spawn(move || {
            runtime.block_on(async move {
                let mut tasks = Vec::new();
                for index in 0..router.clusters.len() {
                    if router.clusters[index].health.is_some() {
                        let (router, stop) = (Arc::clone(&router), stop.clone());
                        tasks.push(tokio::spawn(check_cluster(router, index, stop)));
                    }
                }
                for task in tasks {
                    let _ = task.await;
                }
            })
        })?;
    Ok(())
}

async fn check_cluster(router: Arc<Router>, index: usize, mut stop: watch::Receiver<bool>) {
    let cluster = &router.clusters[index];
    let Some(settings) = &cluster.health else {
        return;
    };
    let mut health = vec![MemberHealth::default(); cluster.members.len()];
    let mut ticks = tokio::time::interval(settings.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        // Every member at once, each bounded by the timeout.
        let mut checks = tokio::task::JoinSet::new();
        for member in 0..cluster.members.len() {
            let router = Arc::clone(&router);
            checks.spawn(async move {
                let cluster = &router.clusters[index];
                let Some(settings) = &cluster.health else {
                    return (member, Ok(()));
                };
                let checked = check(&cluster.members[member], settings);
                let result = match tokio::time::timeout(settings.timeout, checked).await {
                    Ok(result) => result,
                    Err(_) => Err(format!("no answer within {:?}", settings.timeout)),
                };
                (member, result)
            });
        }
        while let Some(Ok((member, result))) = checks.join_next().await {
            let passed = result.is_ok();
            let Some(up) = health[member].observe(passed, settings.rise, settings.fall) else {
                continue;
            };
            {
                let mut balancer = crate::balancer::lock(&cluster.balancer);
                balancer.set_down(member, !up);
                if !up && settings.shutdown_sessions {
                    balancer.evict(member);
                }
            }
            announce(cluster, member, up, settings, result.err());
        }
    }
}

fn announce(
    cluster: &Cluster,
    member: usize,
    up: bool,
    settings: &HealthSettings,
    why: Option<String>,
) {
    let url = &cluster.members[member].url;
    if up {
        tracing::info!(
            "member {url} of cluster {} is up: {} checks passed in a row",
            cluster.name,
            settings.rise
        );
    } else {
        tracing::warn!(
            "member {url} of cluster {} is down: {} checks failed in a row, the last: {}{}",
            cluster.name,
            settings.fall,
            why.unwrap_or_default(),
            if settings.shutdown_sessions {
                "; closing its tunnels"
            } else {
                ""
            }
        );
    }
}

/// One check of one member.
async fn check(member: &Member, settings: &HealthSettings) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect(member.address)
        .await
        .map_err(|error| format!("connect: {error}"))?;
    if settings.kind == CheckKind::Tcp {
        return Ok(());
    }
    match &member.tls {
        None => ask(stream, member, settings).await,
        Some(tls) => {
            let stream = tls
                .connector
                .connect(tls.server_name.clone(), stream)
                .await
                .map_err(|error| format!("TLS: {error}"))?;
            ask(stream, member, settings).await
        }
    }
}

/// Sends the check's request and reads the status line.
async fn ask(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    member: &Member,
    settings: &HealthSettings,
) -> Result<(), String> {
    let host = member
        .url
        .split("://")
        .nth(1)
        .unwrap_or("")
        .trim_end_matches('/');
    let request = match settings.kind {
        CheckKind::WebSocket => format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: wsplice-health\r\n\
             Upgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: d3NwbGljZSBoZWFsdGggMQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            settings.path
        ),
        _ => format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: wsplice-health\r\n\
             Connection: close\r\n\r\n",
            settings.path
        ),
    };
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|error| format!("send: {error}"))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") && line.len() < 256 {
        match stream.read(&mut byte).await {
            Ok(1) => line.push(byte[0]),
            Ok(_) => return Err("closed before a status line".into()),
            Err(error) => return Err(format!("read: {error}")),
        }
    }
    let status = String::from_utf8_lossy(&line);
    let code: Option<u16> = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok());
    let expected = match settings.kind {
        CheckKind::WebSocket => 101,
        _ => settings.expect_status,
    };
    let _ = stream.shutdown().await;
    if code == Some(expected) {
        Ok(())
    } else {
        Err(format!(
            "answered {:?}, expected {expected}",
            status.trim_end()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_and_rise_need_results_in_a_row() {
        let mut health = MemberHealth::default();
        // fall = 3: two failures and a pass change nothing.
        assert_eq!(health.observe(false, 2, 3), None);
        assert_eq!(health.observe(false, 2, 3), None);
        assert_eq!(health.observe(true, 2, 3), None);
        assert_eq!(health.observe(false, 2, 3), None);
        assert_eq!(health.observe(false, 2, 3), None);
        assert_eq!(health.observe(false, 2, 3), Some(false));
        assert_eq!(health.observe(false, 2, 3), None);
        // rise = 2.
        assert_eq!(health.observe(true, 2, 3), None);
        assert_eq!(health.observe(false, 2, 3), None);
        assert_eq!(health.observe(true, 2, 3), None);
        assert_eq!(health.observe(true, 2, 3), Some(true));
    }
}
