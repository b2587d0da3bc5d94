//! The data plane against real sockets, in both modes: sockmap (real BPF, needs root) and the
//! userspace relay. Heavy and root-only, so ignored by plain `cargo test`; `cargo xtask test`
//! runs them single-threaded in release.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use wsplice::config::DataplaneMode;
use wsplice::server::ServerHandle;

macro_rules! in_every_mode {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[test]
            #[ignore = "needs root and BPF: run with `cargo xtask test`"]
            fn sockmap() {
                super::$scenario(wsplice::config::DataplaneMode::Sockmap);
            }
            #[test]
            #[ignore = "heavy: run with `cargo xtask test`"]
            fn userspace() {
                super::$scenario(wsplice::config::DataplaneMode::Userspace);
            }
            #[test]
            #[ignore = "heavy: run with `cargo xtask test`"]
            fn splice() {
                super::$scenario(wsplice::config::DataplaneMode::Splice);
            }
        }
    )*};
}

in_every_mode!(
    one_gib_each_way_through_one_connection,
    sixty_four_concurrent_connections_of_random_sizes,
    ten_thousand_close_and_half_close_races,
    bytes_around_the_handover_arrive_once_in_order,
    a_slow_reader_holds_bounded_memory,
    a_reset_on_either_side_closes_the_other_and_leaves_no_state,
    an_idle_tunnel_is_closed_and_an_active_one_is_not,
    byrequests_splits_held_connections_evenly,
    least_conn_refills_the_member_that_emptied,
);

fn run_and_check(
    proxy: &ServerHandle,
    members: &[Member],
    plans: Vec<ClientPlan>,
    parallel: usize,
) {
    run_and_check_over(&plain_dial(), proxy, members, plans, parallel);
}

fn one_gib_each_way_through_one_connection(mode: DataplaneMode) {
    const GIB: u64 = 1 << 30;
    let members = start_members(1);
    let bound = std::env::var("WSPLICE_TEST_BOUND")
        .ok()
        .and_then(|v| v.parse().ok());
    let proxy = start_proxy(mode, &members, "byrequests", bound);
    let started = Instant::now();
    run_and_check(&proxy, &members, vec![ClientPlan::simple(1, GIB, GIB)], 1);
    eprintln!("{mode:?}: 1 GiB each way in {:?}", started.elapsed());
    if let Some(sockmap) = proxy.shared.dataplane.sockmap() {
        // The kernel carried the bulk: userspace relayed at most what backpressure passed,
        // and at the hand-over what the HTTP stage had read past the member's 101 (its
        // 8 KiB read can take the head and the first bytes of one coalesced skb).
        let redirected = sockmap.stats.bytes_redirected.load(Ordering::SeqCst);
        let relayed = sockmap.stats.bytes_relayed.load(Ordering::SeqCst);
        let trimmed = sockmap.stats.bytes_trimmed.load(Ordering::SeqCst);
        let handed_over = proxy.shared.dataplane.handover_bytes.load(Ordering::SeqCst);
        eprintln!(
            "redirected {redirected} bytes, relayed in userspace {relayed} bytes, forwarded at the hand-over {handed_over} bytes, trimmed {trimmed} overlapping bytes"
        );
        assert_eq!(
            redirected + relayed + handed_over,
            2 * GIB,
            "every payload byte is counted once"
        );
    }
    proxy.stop();
}

fn sixty_four_concurrent_connections_of_random_sizes(mode: DataplaneMode) {
    let members = start_members(3);
    let proxy = start_proxy(mode, &members, "byrequests", None);
    let mut rng = Rng(0x64);
    let plans = (0..64)
        .map(|id| {
            let mut plan = ClientPlan::simple(id, rng.below(16 << 20), rng.below(16 << 20));
            plan.up_with_request = rng.below(8192);
            plan.down_early = rng.below(8192);
            plan
        })
        .collect();
    run_and_check(&proxy, &members, plans, 64);
    proxy.stop();
}

fn ten_thousand_close_and_half_close_races(mode: DataplaneMode) {
    let members = start_members(3);
    let proxy = start_proxy(mode, &members, "byrequests", None);
    let plans = race_plans(0x10_000, 10_000);
    let started = Instant::now();
    run_and_check(&proxy, &members, plans, 32);
    eprintln!("{mode:?}: 10,000 races in {:?}", started.elapsed());
    proxy.stop();
}

fn bytes_around_the_handover_arrive_once_in_order(mode: DataplaneMode) {
    let members = start_members(1);
    let proxy = start_proxy(mode, &members, "byrequests", None);
    let mut plans = Vec::new();
    for id in 0..200u64 {
        let mut plan = ClientPlan::simple(id, 200_000 + id * 997, 150_000 + id * 991);
        plan.up_with_request = (id * 131) % 20_000; // with the request
        plan.down_early = (id * 173) % 20_000; // with the 101
        plan.up_before_101 = id % 2 == 0; // between the 101 and the insertion, or before it
        plans.push(plan);
    }
    run_and_check(&proxy, &members, plans, 16);
    proxy.stop();
}

fn a_slow_reader_holds_bounded_memory(mode: DataplaneMode) {
    const BOUND: u64 = 4 << 20;
    let members = start_members(1);
    let proxy = start_proxy(mode, &members, "byrequests", Some(BOUND));
    let mut stream = TcpStream::connect(proxy.addresses[0]).unwrap();
    let mut plan = ClientPlan::simple(1, u64::MAX, 0);
    plan.slow_member = Some(Duration::from_secs(4));
    std::io::Write::write_all(&mut stream, upgrade_request(&plan).as_bytes()).unwrap();
    let (head, _) = read_head(&mut stream).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");

    // The client pushes as fast as it can for 3 s, while the member reads 4 KiB every 10 ms.
    let base_acked = wsplice::sys::tcp_info(std::os::fd::AsFd::as_fd(&stream))
        .unwrap()
        .bytes_acked;
    let writer_stream = stream.try_clone().unwrap();
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let sent = Arc::clone(&sent);
        thread::spawn(move || {
            let mut out = writer_stream;
            out.set_write_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(3);
            let mut buf = vec![0u8; 64 * 1024];
            let mut offset = 0u64;
            while Instant::now() < deadline {
                Pattern(plan.up_seed).fill(offset, &mut buf);
                match std::io::Write::write(&mut out, &buf) {
                    Ok(n) => offset += n as u64,
                    Err(_) => continue, // write timeout: the window is shut, try again
                }
                sent.store(offset, Ordering::SeqCst);
            }
            offset
        })
    };
    // Sampled while the writer pushes.
    let peak = peak_held(&stream, base_acked, &members[0], Duration::from_secs(3));
    let pushed = writer.join().unwrap();
    eprintln!(
        "{mode:?}: client pushed {pushed} bytes in 3 s; peak held by wsplice {peak} bytes (bound {BOUND})"
    );
    assert!(pushed > 0);
    assert!(
        peak < BOUND,
        "wsplice held {peak} bytes, over the {BOUND}-byte bound"
    );
    assert!(
        peak > 0,
        "nothing was measured as held: the measurement is broken"
    );
    stream.shutdown(Shutdown::Both).unwrap();
    drop(stream);
    assert_no_state_left(&proxy);
    proxy.stop();
}

/// `idle_timeout = 1s`: a held tunnel that moves nothing is closed within the timeout and a
/// sweep; one that sends a byte every 150 ms stays open.
fn an_idle_tunnel_is_closed_and_an_active_one_is_not(mode: DataplaneMode) {
    let members = start_members(1);
    let proxy = start_proxy_with(mode, &members, "byrequests", |settings| {
        settings.idle_timeout = Some(Duration::from_secs(1));
    });
    let address = proxy.addresses[0];
    let mut active = TcpStream::connect(address).unwrap();
    let request = upgrade_request(&ClientPlan::simple(2, 0, 0))
        .replace("x-test-id", "x-test-hold: 1\r\nx-test-id");
    active.write_all(request.as_bytes()).unwrap();
    let (head, _) = read_head(&mut active).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let idle = Held::open(address, 1);
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2_500) {
        active.write_all(b"x").unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(idle.ended(), "the idle tunnel is still open after 2.5 s");
    // The active one is open: a read waits instead of seeing an EOF.
    active
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut byte = [0u8; 1];
    match active.read(&mut byte) {
        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the active tunnel was closed: {other:?}"),
    }
    drop(active);
    drop(idle);
    assert_no_state_left(&proxy);
    proxy.stop();
}

fn a_reset_on_either_side_closes_the_other_and_leaves_no_state(mode: DataplaneMode) {
    let members = start_members(1);
    let proxy = start_proxy(mode, &members, "byrequests", None);
    resets_close_the_other_side(&proxy, &members);
    proxy.stop();
}

/// 50 held pairs through `proxy` to `members[0]`, each ended by a reset from one side.
fn resets_close_the_other_side(proxy: &ServerHandle, members: &[Member]) {
    for round in 0..50u64 {
        let held = Held::open(proxy.addresses[0], round);
        assert!(wait_until(Duration::from_secs(5), || members[0]
            .open
            .load(Ordering::SeqCst)
            == 1));
        if round % 2 == 0 {
            held.reset();
            let closed = wait_until(Duration::from_secs(5), || {
                members[0].open.load(Ordering::SeqCst) == 0
            });
            assert!(
                closed,
                "round {round}: the member side stayed open after the client reset"
            );
        } else {
            // The member resets its side.
            members[0].release_with_reset.store(true, Ordering::SeqCst);
            let ended = wait_until(Duration::from_secs(5), || held.ended());
            members[0].release_with_reset.store(false, Ordering::SeqCst);
            assert!(
                ended,
                "round {round}: the client side stayed open after the member reset"
            );
            assert!(wait_until(Duration::from_secs(5), || members[0]
                .open
                .load(Ordering::SeqCst)
                == 0));
        }
    }
    assert_no_state_left(proxy);
}

/// Opens `count` held connections (each stays open until either side ends it).
fn hold_connections(proxy: &ServerHandle, first_id: u64, count: u64) -> Vec<Held> {
    (first_id..first_id + count)
        .map(|id| Held::open(proxy.addresses[0], id))
        .collect()
}

fn open_counts(members: &[Member]) -> Vec<usize> {
    members
        .iter()
        .map(|m| m.open.load(Ordering::SeqCst))
        .collect()
}

/// Waits until the members hold `expected` connections each, or fails saying what they hold.
fn assert_open_counts(members: &[Member], expected: [usize; 3], limit: Duration) {
    let reached = wait_until(limit, || open_counts(members) == expected);
    assert!(
        reached,
        "members hold {:?}, expected {expected:?}",
        open_counts(members)
    );
}

fn byrequests_splits_held_connections_evenly(mode: DataplaneMode) {
    let members = start_members(3);
    let proxy = start_proxy(mode, &members, "byrequests", None);
    let held = hold_connections(&proxy, 0, 300);
    assert_open_counts(&members, [100, 100, 100], Duration::from_secs(5));
    drop(held);
    assert_open_counts(&members, [0, 0, 0], Duration::from_secs(10));
    assert_no_state_left(&proxy);
    proxy.stop();
}

fn least_conn_refills_the_member_that_emptied(mode: DataplaneMode) {
    let members = start_members(3);
    let proxy = start_proxy(mode, &members, "least-conn", None);
    let held = hold_connections(&proxy, 0, 300);
    assert_open_counts(&members, [100, 100, 100], Duration::from_secs(5));
    // Every connection of member 0 ends (the member closes them).
    members[0].release.store(true, Ordering::SeqCst);
    assert!(wait_until(Duration::from_secs(10), || members[0]
        .open
        .load(Ordering::SeqCst)
        == 0));
    members[0].release.store(false, Ordering::SeqCst);
    // The proxy must have counted those tunnels out before the next picks.
    let tunnels_counted_out = wait_until(Duration::from_secs(10), || {
        proxy.shared.router.clusters[0]
            .balancer
            .lock()
            .unwrap()
            .live(0)
            == 0
    });
    assert!(tunnels_counted_out);
    let more = hold_connections(&proxy, 1000, 100);
    assert_open_counts(&members, [100, 100, 100], Duration::from_secs(5));
    assert_eq!(members[0].accepted.load(Ordering::SeqCst), 200);
    drop(held);
    drop(more);
    assert_open_counts(&members, [0, 0, 0], Duration::from_secs(10));
    assert_no_state_left(&proxy);
    proxy.stop();
}

/// `offload_after`: a pair is relayed in userspace first. Pairs that close sooner never reach
/// the kernel; pairs that live longer are handed to it between two reads, with bytes queued
/// (their members read slowly across the hand-over); and with a trial of 2 ms,
/// hand-overs race thousands of closes and half-closes, and pairs half closed early finish in
/// userspace. Every byte is checked each way; a reset during the trial closes the other side.
#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn pairs_move_to_the_kernel_after_their_trial() {
    let members = start_members(3);
    let trial = Duration::from_secs(1);
    let proxy = start_proxy_with(DataplaneMode::Sockmap, &members, "byrequests", |server| {
        server.offload_after = Some(trial)
    });
    let sockmap = proxy.shared.dataplane.sockmap().unwrap();
    let offloaded = || sockmap.stats.pairs_offloaded.load(Ordering::SeqCst);
    run_and_check(&proxy, &members, race_plans(0x7141, 1000), 32);
    assert_eq!(
        offloaded(),
        0,
        "pairs that closed within {trial:?} reached the kernel"
    );
    let plans = (0..16)
        .map(|id| {
            // 16 MiB up, more than every socket buffer on the way holds while the member reads
            // slowly for 1.5 s: bytes queue in the proxy's sockets across the hand-over. The
            // client ends after 1.5 s at the earliest; the member answers after that end,
            // through the kernel.
            let mut plan = ClientPlan::simple(10_000 + id, 16 << 20, 2 << 20);
            plan.slow_member = Some(Duration::from_millis(1500));
            plan.pause_before_close = Duration::from_millis(1500);
            plan.down_after_eof = true;
            plan
        })
        .collect();
    run_and_check(&proxy, &members, plans, 16);
    assert_eq!(offloaded(), 16, "pairs that lived past {trial:?}");
    assert!(
        sockmap.stats.bytes_redirected.load(Ordering::SeqCst) > 0,
        "the kernel carried nothing after the hand-over"
    );
    assert_no_state_left(&proxy);
    proxy.stop();

    // Fresh members: their reports are keyed by connection id, and the races reuse ids.
    let members = start_members(3);
    let proxy = start_proxy_with(DataplaneMode::Sockmap, &members, "byrequests", |server| {
        server.offload_after = Some(Duration::from_millis(2))
    });
    run_and_check(&proxy, &members, race_plans(0x2, 3000), 32);
    let sockmap = proxy.shared.dataplane.sockmap().unwrap();
    let raced = sockmap.stats.pairs_offloaded.load(Ordering::SeqCst);
    eprintln!("2 ms trial: {raced} of 3000 racing pairs reached the kernel");
    assert!(raced > 0, "no hand-over raced a close");
    // Half closed before the trial starts: the client's FIN is passed on at once, and the
    // member's 16 MiB answer, still flowing when the trial ends, stays in userspace.
    let plans = (0..16)
        .map(|id| {
            let mut plan = ClientPlan::simple(20_000 + id, 1000, 16 << 20);
            plan.up_before_101 = true;
            plan.down_after_eof = true;
            plan
        })
        .collect();
    run_and_check(&proxy, &members, plans, 16);
    assert_eq!(
        sockmap.stats.pairs_offloaded.load(Ordering::SeqCst),
        raced,
        "a half-closed pair reached the kernel"
    );
    assert_no_state_left(&proxy);
    proxy.stop();

    // Resets during the trial close the other side, as in the kernel.
    let members = start_members(1);
    let proxy = start_proxy_with(DataplaneMode::Sockmap, &members, "byrequests", |server| {
        server.offload_after = Some(Duration::from_secs(60))
    });
    resets_close_the_other_side(&proxy, &members);
    let sockmap = proxy.shared.dataplane.sockmap().unwrap();
    assert_eq!(sockmap.stats.pairs_offloaded.load(Ordering::SeqCst), 0);
    proxy.stop();
}

#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn auto_mode_offloads_only_on_proven_kernels() {
    let members = start_members(1);
    let mut config = userspace_config(vec![format!("ws://{}", members[0].address)]);
    config.server.dataplane = DataplaneMode::Auto;
    let proxy = wsplice::server::start(config).unwrap();
    let proven = wsplice::offload::kernel_release() >= wsplice::offload::OLDEST_TESTED_KERNEL;
    let announcement = &proxy.shared.dataplane.announcement;
    if proven {
        assert_eq!(
            proxy.shared.dataplane.carrier(),
            wsplice::dataplane::Carrier::Sockmap,
            "{announcement}"
        );
    } else {
        assert_eq!(
            proxy.shared.dataplane.carrier(),
            wsplice::dataplane::Carrier::Userspace,
            "{announcement}"
        );
        assert!(announcement.contains("older than 6.18"), "{announcement}");
    }
    run_and_check(
        &proxy,
        &members,
        vec![ClientPlan::simple(1, 1 << 20, 1 << 20)],
        1,
    );
    proxy.stop();
}
