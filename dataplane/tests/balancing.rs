//! Balancing with real members: sticky sessions (cookie and URL parameter, Apache's forms),
//! a sticky member that is down, hot standby, connection limits and consistent hashing.

mod common;

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;
use wsplice::config::DataplaneMode;
use wsplice::server::ServerHandle;

/// A wsplice serving one cluster: `cluster` holds the cluster's keys, `members` one line of
/// member keys each (url first).
fn proxy(cluster: &str, members: &[String]) -> ServerHandle {
    proxy_in(DataplaneMode::Userspace, cluster, members)
}

fn proxy_in(mode: DataplaneMode, cluster: &str, members: &[String]) -> ServerHandle {
    proxy_in_with(mode, cluster, members, |_| {})
}

/// `proxy_in`, with `edit` applied to the [server] settings.
fn proxy_in_with(
    mode: DataplaneMode,
    cluster: &str,
    members: &[String],
    edit: impl FnOnce(&mut wsplice::config::ServerSettings),
) -> ServerHandle {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\ncluster = \"c\"\n\
         [[cluster]]\nname = \"c\"\n{cluster}\n"
    );
    for member in members {
        text.push_str(&format!("[[cluster.member]]\n{member}\n"));
    }
    let mut config = wsplice::config::parse("balancing.toml", &text).unwrap();
    config.server.workers = 2;
    config.server.dataplane = mode;
    edit(&mut config.server);
    wsplice::server::start(config).unwrap()
}

fn url(member: &Member) -> String {
    format!("url = \"ws://{}\"", member.address)
}

/// A port nothing listens on: a member that is down.
fn dead_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    format!("url = \"ws://{address}\"")
}

/// One upgrade (request `path`, extra header lines), closed at once; returns the 101's head
/// and the index of the member that took it.
fn upgrade(
    proxy: SocketAddr,
    members: &[Member],
    id: u64,
    path: &str,
    extra: &str,
) -> (String, usize) {
    let mut stream = TcpStream::connect(proxy).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = upgrade_request(&ClientPlan::simple(id, 0, 0))
        .replacen("GET /ws ", &format!("GET {path} "), 1)
        .replacen("x-test-id", &format!("{extra}x-test-id"), 1);
    stream.write_all(request.as_bytes()).unwrap();
    let (head, _) = read_head(&mut stream).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "connection {id}: {head}");
    drop(stream);
    let report = wait_for_report(members, id, Duration::from_secs(10)).unwrap();
    (head, report.member)
}

fn set_cookie(head: &str) -> Option<&str> {
    header(head, "set-cookie")
}

const STICKY: &str =
    "stickysession = \"ROUTEID|route\"\nsticky_cookie = { name = \"ROUTEID\", max_age = \"1h\" }";

#[test]
fn a_thousand_reconnects_with_the_sticky_cookie_reach_the_same_member() {
    let members = start_members(3);
    let lines: Vec<String> = members
        .iter()
        .enumerate()
        .map(|(i, m)| format!("{}\nroute = \"server{}\"", url(m), i + 1))
        .collect();
    let proxy = proxy(STICKY, &lines);
    let address = proxy.addresses[0];
    // A first visit learns its route from the 101.
    let (head, first) = upgrade(address, &members, 1, "/ws", "");
    let expected = format!(
        "ROUTEID=.server{}; Path=/; Max-Age=3600; HttpOnly",
        first + 1
    );
    assert_eq!(set_cookie(&head), Some(expected.as_str()), "{head}");
    let cookie = format!("Cookie: theme=dark; ROUTEID=.server{}\r\n", first + 1);
    for id in 2..1_002 {
        let (head, member) = upgrade(address, &members, id, "/ws", &cookie);
        assert_eq!(member, first, "reconnect {id} went elsewhere");
        assert_eq!(
            set_cookie(&head),
            None,
            "a sticky client needs no new cookie"
        );
    }
    // Apache's URL parameter form, and the whole value as the route.
    let (_, member) = upgrade(address, &members, 2_000, "/ws?x=1&route=s.server3", "");
    assert_eq!(member, 2);
    let (_, member) = upgrade(
        address,
        &members,
        2_001,
        "/ws",
        "Cookie: ROUTEID=server2\r\n",
    );
    assert_eq!(member, 1);
    proxy.stop();
}

#[test]
fn a_sticky_member_that_is_down_is_replaced_and_the_cookie_rewritten() {
    let members = start_members(2);
    let lines = vec![
        format!("{}\nroute = \"server1\"", dead_url()),
        format!("{}\nroute = \"server2\"", url(&members[0])),
        format!("{}\nroute = \"server3\"", url(&members[1])),
    ];
    let proxy = proxy(STICKY, &lines);
    let address = proxy.addresses[0];
    for id in 1..=20 {
        let (head, member) = upgrade(address, &members, id, "/ws", "Cookie: ROUTEID=.server1\r\n");
        let cookie = set_cookie(&head).unwrap_or_default().to_string();
        assert!(
            cookie.starts_with(&format!("ROUTEID=.server{}", member + 2)),
            "connection {id}: member {member}, cookie {cookie:?}"
        );
    }
    proxy.stop();
}

#[test]
fn hot_standby_takes_over_only_when_every_active_member_is_out() {
    let members = start_members(2);
    let standby = format!("{}\nstatus = \"+H\"", url(&members[1]));
    // One active member up: the standby gets nothing.
    let proxy_up = proxy("", &[url(&members[0]), dead_url(), standby.clone()]);
    for id in 1..=200 {
        let (_, member) = upgrade(proxy_up.addresses[0], &members, id, "/ws", "");
        assert_eq!(member, 0, "connection {id}");
    }
    proxy_up.stop();
    // Every active member down: the standby takes all, with no failed upgrade.
    let proxy_down = proxy("retry = \"60s\"", &[dead_url(), dead_url(), standby]);
    for id in 1_001..=1_200 {
        let (_, member) = upgrade(proxy_down.addresses[0], &members, id, "/ws", "");
        assert_eq!(member, 1, "connection {id}");
    }
    proxy_down.stop();
}

#[test]
fn a_member_at_its_connection_limit_is_skipped_then_503() {
    let members = start_members(2);
    let proxy = proxy(
        "lbmethod = \"least-conn\"",
        &[
            format!("{}\nmax_conns = 2", url(&members[0])),
            format!("{}\nmax_conns = 1", url(&members[1])),
        ],
    );
    let address = proxy.addresses[0];
    let held: Vec<Held> = (1..=3).map(|id| Held::open(address, id)).collect();
    let (status, answer) = raw_exchange(
        address,
        upgrade_request(&ClientPlan::simple(9, 0, 0)).as_bytes(),
    );
    assert!(status.starts_with("HTTP/1.1 503"), "{status}");
    assert!(answer.contains("connection limit"), "{answer}");
    drop(held);
    assert_no_state_left(&proxy);
    let (_, member) = upgrade(address, &members, 10, "/ws", "");
    assert!(member < 2);
    proxy.stop();
}

#[test]
fn hashing_a_header_pins_each_key_to_one_member() {
    let members = start_members(3);
    let lines: Vec<String> = members.iter().map(url).collect();
    let proxy = proxy("lbmethod = \"hash\"\nhash_key = \"header:X-User\"", &lines);
    let address = proxy.addresses[0];
    let mut per_member = [0; 3];
    let mut id = 0;
    for user in 0..60 {
        let extra = format!("X-User: user-{user}\r\n");
        let mut first = None;
        for _ in 0..5 {
            id += 1;
            let (_, member) = upgrade(address, &members, id, "/ws", &extra);
            assert_eq!(*first.get_or_insert(member), member, "user {user} moved");
        }
        per_member[first.unwrap()] += 1;
    }
    assert!(
        per_member.iter().all(|&n| n >= 10),
        "users per member: {per_member:?}"
    );
    proxy.stop();
}

#[test]
fn bytraffic_sends_new_tunnels_to_the_member_that_moved_less() {
    let members = start_members(2);
    let lines: Vec<String> = members.iter().map(url).collect();
    let proxy = proxy("lbmethod = \"bytraffic\"", &lines);
    let address = proxy.addresses[0];
    // One tunnel moves 8 MiB each way, then ends.
    let report = run_client(address, &ClientPlan::simple(1, 8 << 20, 8 << 20)).unwrap();
    assert_eq!(report.received, Ok(8 << 20));
    let heavy = wait_for_report(&members, 1, Duration::from_secs(10))
        .unwrap()
        .member;
    assert_no_state_left(&proxy);
    // Small tunnels go to the other member until it has moved as much.
    for id in 2..=21 {
        let (_, member) = upgrade(address, &members, id, "/ws", "");
        assert_ne!(member, heavy, "connection {id}");
    }
    proxy.stop();
}

/// A TCP forwarder in front of a member that can be killed (listener closed, every forwarded
/// connection reset) and brought back on the same port: a member that dies and returns.
struct Gate {
    address: SocketAddr,
    target: SocketAddr,
    alive: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
}

impl Gate {
    fn open(target: SocketAddr) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let gate = Gate {
            address: listener.local_addr().unwrap(),
            target,
            alive: Arc::new(AtomicBool::new(true)),
            connections: Arc::default(),
        };
        gate.serve(listener);
        gate
    }

    fn serve(&self, listener: TcpListener) {
        let (alive, connections, target) = (
            Arc::clone(&self.alive),
            Arc::clone(&self.connections),
            self.target,
        );
        listener.set_nonblocking(true).unwrap();
        thread::spawn(move || {
            while alive.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(5));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let Ok(member) = TcpStream::connect(target) else {
                    continue;
                };
                let mut held = connections.lock().unwrap();
                held.push(client.try_clone().unwrap());
                held.push(member.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), member.try_clone().unwrap()),
                    (member, client),
                ] {
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            }
        });
    }

    /// The member dies: no more accepts, every connection through it ends.
    fn kill(&self) {
        self.refuse_new();
        for stream in self.connections.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// The member takes no new connection (its health checks fail); open ones go on.
    fn refuse_new(&self) {
        self.alive.store(false, Ordering::SeqCst);
        thread::sleep(Duration::from_millis(20)); // the accept loop sees it and drops the listener
    }

    /// The member comes back on the same port.
    fn revive(&self) {
        self.alive.store(true, Ordering::SeqCst);
        self.serve(TcpListener::bind(self.address).unwrap());
    }
}

#[test]
fn a_killed_member_is_routed_around_and_gets_traffic_again_when_it_returns() {
    let members = start_members(2);
    let gates = [
        Gate::open(members[0].address),
        Gate::open(members[1].address),
    ];
    let lines: Vec<String> = gates
        .iter()
        .map(|g| format!("url = \"ws://{}\"", g.address))
        .collect();
    let proxy = proxy(
        "retry = \"1s\"\nhealth = { check = \"websocket\", path = \"/health\", interval = \"100ms\", \
         timeout = \"500ms\", rise = 2, fall = 2 }",
        &lines,
    );
    let address = proxy.addresses[0];
    let balancer = &proxy.shared.router.clusters[0].balancer;
    let held: Vec<Held> = (1..=10).map(|id| Held::open(address, id)).collect();
    gates[0].kill();
    // Its tunnels end with a close; the others stay.
    assert!(wait_until(Duration::from_secs(5), || held
        .iter()
        .filter(|h| h.ended())
        .count()
        == 5));
    // New connections all succeed, on the member that is up.
    for id in 100..200 {
        let (_, member) = upgrade(address, &members, id, "/ws", "");
        assert_eq!(member, 1, "connection {id}");
    }
    assert!(
        wait_until(Duration::from_secs(5), || wsplice::balancer::lock(balancer)
            .is_down(0)),
        "the health checks did not mark the killed member down"
    );
    gates[0].revive();
    assert!(
        wait_until(Duration::from_secs(5), || !wsplice::balancer::lock(
            balancer
        )
        .is_down(0)),
        "the health checks did not bring the member back"
    );
    // Its retry has passed too: it gets traffic again.
    thread::sleep(Duration::from_millis(1_100));
    let back = (200..220)
        .filter(|&id| upgrade(address, &members, id, "/ws", "").1 == 0)
        .count();
    assert!(
        back >= 5,
        "{back} of 20 new connections went to the returned member"
    );
    drop(held);
    proxy.stop();
}

/// HAProxy's on-marked-down shutdown-sessions: a member that stops taking connections (its
/// open tunnels still alive) is marked down by the health checks; with `shutdown_sessions`
/// its tunnels are closed, without it they stay.
#[test]
fn shutdown_sessions_closes_the_tunnels_of_a_member_marked_down() {
    shutdown_sessions_in(DataplaneMode::Userspace, None);
    shutdown_sessions_in(DataplaneMode::Splice, None);
}

/// Tunnels already in the kernel, and tunnels still in their userspace trial.
#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn shutdown_sessions_closes_offloaded_tunnels_of_a_member_marked_down() {
    shutdown_sessions_in(DataplaneMode::Sockmap, None);
    shutdown_sessions_in(DataplaneMode::Sockmap, Some(Duration::from_secs(30)));
}

fn shutdown_sessions_in(mode: DataplaneMode, offload_after: Option<Duration>) {
    for shutdown in [true, false] {
        let members = start_members(1);
        let gate = Gate::open(members[0].address);
        let health = format!(
            "health = {{ check = \"tcp\", interval = \"100ms\", timeout = \"500ms\", rise = 1, \
             fall = 2, shutdown_sessions = {shutdown} }}"
        );
        let proxy = proxy_in_with(
            mode,
            &health,
            &[format!("url = \"ws://{}\"", gate.address)],
            |settings| settings.offload_after = offload_after,
        );
        let balancer = &proxy.shared.router.clusters[0].balancer;
        let held: Vec<Held> = (1..=4)
            .map(|id| Held::open(proxy.addresses[0], id))
            .collect();
        gate.refuse_new();
        assert!(wait_until(Duration::from_secs(5), || {
            wsplice::balancer::lock(balancer).is_down(0)
        }));
        let closed = wait_until(Duration::from_secs(3), || held.iter().all(Held::ended));
        assert_eq!(
            closed, shutdown,
            "{mode:?} (offload_after {offload_after:?}): shutdown_sessions = {shutdown}"
        );
        if let Some(sockmap) = proxy.shared.dataplane.sockmap() {
            let offloaded = sockmap.stats.pairs_offloaded.load(Ordering::Relaxed);
            let expected = if offload_after.is_none() { 4 } else { 0 };
            assert_eq!(offloaded, expected, "tunnels the kernel took");
        }
        drop(held);
        proxy.stop();
    }
}

#[test]
fn an_http_check_follows_the_status_the_member_answers() {
    use std::io::Read;
    use std::sync::atomic::AtomicU16;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let status = Arc::new(AtomicU16::new(204));
    let requests = Arc::new(Mutex::new(Vec::new()));
    {
        let (status, requests) = (Arc::clone(&status), Arc::clone(&requests));
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && matches!(stream.read(&mut byte), Ok(1)) {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                requests
                    .lock()
                    .unwrap()
                    .push(head.lines().next().unwrap_or("").to_string());
                let code = status.load(Ordering::SeqCst);
                let _ = stream.write_all(
                    format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                );
            }
        });
    }
    let proxy = proxy(
        "health = { check = \"http\", path = \"/health?full=1\", expect_status = 204, \
         interval = \"100ms\", timeout = \"500ms\", rise = 1, fall = 2 }",
        &[format!("url = \"ws://{address}\"")],
    );
    let balancer = &proxy.shared.router.clusters[0].balancer;
    let is_down = || wsplice::balancer::lock(balancer).is_down(0);
    assert!(wait_until(Duration::from_secs(2), || requests
        .lock()
        .unwrap()
        .len()
        >= 3));
    assert!(!is_down(), "204 as expected, yet down");
    assert_eq!(requests.lock().unwrap()[0], "GET /health?full=1 HTTP/1.1");
    status.store(503, Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(3), is_down),
        "503 did not mark it down"
    );
    status.store(204, Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(3), || !is_down()),
        "204 did not bring it back"
    );
    proxy.stop();
}
