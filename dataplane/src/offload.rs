//! Kernel offload of established pairs (ws:// <-> ws://): BPF sockmap redirection.
//!
//! A pair is handed over after the bytes that came with its handshake are forwarded. Both
//! sockets then join the SOCKS sockhash; the verdict in ebpf/wsplice.bpf.c redirects each side's
//! bytes to the other's egress. One carrier thread watches every offloaded pair through its own
//! epoll set (RDHUP and errors only, so redirected bytes never wake userspace) and:
//! - relays bytes the verdict passed back (the peer's receiver was behind, or the peer was not
//!   in the map yet), with normal TCP flow control, before redirection resumes;
//! - propagates a half-close only after every redirected byte has reached the peer's socket;
//! - closes both sockets when either side resets, and removes every map entry.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use aya::maps::{Map, MapData, RingBuf, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};

use crate::balancer::Lease;
use crate::sys::{self, BpfFlow, BpfLink};

/// The verdict object built from ebpf/wsplice.bpf.c by build.rs (empty when clang was missing).
static BPF_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/wsplice.bpf.o"));

/// Bytes userspace reads at once when relaying passed bytes.
const RELAY_CHUNK: usize = 64 * 1024;
/// How often a pair waiting for its redirected bytes to leave the psock queue is looked at.
const DRAIN_POLL: Duration = Duration::from_millis(1);
/// How often a pair waiting for a slow peer to take bytes is looked at (no wake-up exists for
/// a queue falling under a threshold wsplice chose): often while few pairs are open, less
/// often when many are, so thousands of slow readers cost a bounded number of syscalls.
fn busy_poll(open_pairs: usize) -> Duration {
    if open_pairs <= 64 {
        Duration::from_millis(1)
    } else {
        Duration::from_millis(10)
    }
}
/// Sockmap redirection is used only on kernels at least this new: the suite passes on 6.18;
/// on Debian's 6.1 (in the test VM) a partly read skb at hand-over made `tcp_read_skb` skip
/// the stream's last bytes, and draining first to avoid that hit a kernel BUG in
/// `tcp_write_xmit`. Kernels in between are untested, so they take the userspace relay.
pub const OLDEST_TESTED_KERNEL: (u32, u32) = (6, 18);

/// The running kernel's (major, minor) version; (0, 0) when unreadable.
pub fn kernel_release() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|part| part.parse().ok());
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0))
}

/// Token of the carrier's wake pipe and ring buffer in its epoll set.
const WAKE_TOKEN: u64 = u64::MAX;
const EVENTS_TOKEN: u64 = u64::MAX - 1;

/// Counters shared with metrics and tests.
#[derive(Debug, Default)]
pub struct OffloadStats {
    pub pairs_offloaded: AtomicU64,
    pub pairs_open: AtomicU64,
    pub pairs_aborted: AtomicU64,
    /// Bytes the verdict passed back that userspace relayed (backpressure and insertion races).
    pub bytes_relayed: AtomicU64,
    /// Bytes the kernel redirected, counted when a pair closes.
    pub bytes_redirected: AtomicU64,
    /// Bytes of retransmitted skbs the verdict trimmed because they overlapped bytes already
    /// forwarded, counted when a pair closes.
    pub bytes_trimmed: AtomicU64,
    /// Pairs closed for being idle longer than `idle_timeout`.
    pub idle_closed: AtomicU64,
}

/// Map file descriptors, shared by the workers (insertion) and the carrier.
#[derive(Debug)]
struct Maps {
    socks: OwnedFd,
    links: OwnedFd,
    flows: OwnedFd,
    counters: OwnedFd,
}

/// The loaded verdict and its carrier thread.
pub struct Sockmap {
    maps: Arc<Maps>,
    handoff: mpsc::Sender<Tunnel>,
    wake: std::io::PipeWriter,
    /// Set while a wake byte is unread: a burst of hand-overs costs one write and one wake-up.
    wake_pending: Arc<AtomicBool>,
    pub stats: Arc<OffloadStats>,
    /// Keeps the program attached; it detaches when this drops.
    _ebpf: Ebpf,
}

impl std::fmt::Debug for Sockmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sockmap").field("maps", &self.maps).finish()
    }
}

/// An established pair ready for the kernel: client first, member second.
pub struct Pair {
    pub client: TcpStream,
    pub member: TcpStream,
    pub lease: Lease,
    /// Maximum bytes redirected but not yet acked by the receiving peer, per direction.
    pub redirect_limit: u64,
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<Map, String> {
    ebpf.take_map(name)
        .ok_or_else(|| format!("the BPF object has no map {name}"))
}

fn map_fd(map: Map) -> Result<OwnedFd, String> {
    let data: MapData = match map {
        Map::HashMap(data) | Map::Array(data) => data,
        other => return Err(format!("unexpected map kind {other:?}")),
    };
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|error| format!("cannot keep the map fd: {error}"))
}

impl Sockmap {
    /// Loads and attaches the verdict and starts the carrier. The error says why the kernel
    /// path cannot be used, in one line.
    /// Loads the verdict and starts the carrier; a pair with no byte either way for
    /// `idle_timeout` (the verdict records each direction's last skb) is closed.
    pub fn load(max_pairs: u32, idle_timeout: Option<Duration>) -> Result<Sockmap, String> {
        if BPF_OBJECT.is_empty() {
            return Err(
                "the BPF object was not built (clang was missing when wsplice was compiled)".into(),
            );
        }
        if !sys::effective_uid_is_root() {
            return Err("not running as root (loading BPF needs CAP_BPF and CAP_NET_ADMIN)".into());
        }
        let (major, minor) = kernel_release();
        if (major, minor) < OLDEST_TESTED_KERNEL {
            return Err(format!(
                "kernel {major}.{minor} is older than {}.{}, the oldest the sockmap data plane is \
                 proven on (6.1 loses stream tails in tcp_read_skb and hit a kernel BUG in \
                 tcp_write_xmit under redirection)",
                OLDEST_TESTED_KERNEL.0, OLDEST_TESTED_KERNEL.1
            ));
        }
        let sockets = max_pairs.saturating_mul(2).max(64);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("SOCKS", sockets)
            .map_max_entries("LINKS", sockets)
            .map_max_entries("FLOWS", sockets)
            .load(BPF_OBJECT)
            .map_err(|error| first_line(format!("the kernel refused the BPF object: {error}")))?;

        // Load before taking the maps: the program's instructions carry the maps' fds.
        let program: &mut SkSkb = ebpf
            .program_mut("wsplice_verdict")
            .ok_or("the BPF object has no wsplice_verdict program")?
            .try_into()
            .map_err(|error| format!("wsplice_verdict is not an sk_skb program: {error}"))?;
        program
            .load()
            .map_err(|error| first_line(format!("the verifier refused the verdict: {error}")))?;

        let socks: SockHash<MapData, u64> = SockHash::try_from(take_map(&mut ebpf, "SOCKS")?)
            .map_err(|error| format!("SOCKS is not a sockhash: {error}"))?;
        let events = RingBuf::try_from(take_map(&mut ebpf, "EVENTS")?)
            .map_err(|error| format!("EVENTS is not a ring buffer: {error}"))?;
        let maps = Maps {
            socks: socks
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|error| format!("cannot keep the sockhash fd: {error}"))?,
            links: map_fd(take_map(&mut ebpf, "LINKS")?)?,
            flows: map_fd(take_map(&mut ebpf, "FLOWS")?)?,
            counters: map_fd(take_map(&mut ebpf, "COUNTERS")?)?,
        };
        let program: &mut SkSkb = ebpf
            .program_mut("wsplice_verdict")
            .ok_or("the BPF object has no wsplice_verdict program")?
            .try_into()
            .map_err(|error| format!("wsplice_verdict is not an sk_skb program: {error}"))?;
        program
            .attach(socks.fd())
            .map_err(|error| format!("cannot attach the verdict to the sockhash: {error}"))?;

        let maps = Arc::new(maps);
        let stats = Arc::new(OffloadStats::default());
        let (handoff, handed) = mpsc::channel();
        let (wake_reader, wake) =
            std::io::pipe().map_err(|error| format!("cannot create the wake pipe: {error}"))?;
        let epoll = sys::Epoll::new().map_err(|error| format!("epoll: {error}"))?;
        epoll
            .add(wake_reader.as_fd(), sys::EPOLLIN, WAKE_TOKEN)
            .and_then(|()| epoll.add(events.as_fd(), sys::EPOLLIN, EVENTS_TOKEN))
            .map_err(|error| format!("epoll: {error}"))?;
        let wake_pending = Arc::new(AtomicBool::new(false));
        let watcher = Watcher {
            maps: Arc::clone(&maps),
            stats: Arc::clone(&stats),
            epoll,
            wake: wake_reader,
            wake_pending: Arc::clone(&wake_pending),
            events,
            handed,
            next_generation: 0,
            pairs: Vec::new(),
            free: Vec::new(),
            by_cookie: HashMap::new(),
            draining: Vec::new(),
            busy: Vec::new(),
            busy_due: std::time::Instant::now(),
            idle_timeout,
            last_handed: None,
        };
        std::thread::Builder::new()
            .name("wsplice-offload".into())
            .spawn(move || watcher.run())
            .map_err(|error| format!("cannot start the offload thread: {error}"))?;
        Ok(Sockmap {
            maps,
            handoff,
            wake,
            wake_pending,
            stats,
            _ebpf: ebpf,
        })
    }

    /// Puts a pair into the sockhash and gives it to the carrier. When neither socket
    /// can join the map (both already closing), the pair comes back for the userspace relay.
    pub fn offload(&self, pair: Pair) -> Result<(), Pair> {
        let setup = |cookie: u64, peer_cookie: u64, peer: &TcpStream| -> io::Result<u64> {
            let link = BpfLink {
                peer_cookie,
                limit: pair.redirect_limit,
                peer_base: sys::bytes_written(peer.as_fd())?,
                relayed: 0,
            };
            sys::map_update(
                self.maps.flows.as_fd(),
                &cookie,
                &BpfFlow::default(),
                sys::BPF_ANY,
            )?;
            sys::map_update(self.maps.links.as_fd(), &cookie, &link, sys::BPF_ANY)?;
            Ok(link.peer_base)
        };
        let forget = |cookies: &[u64]| {
            for cookie in cookies {
                let _ = sys::map_delete(self.maps.links.as_fd(), cookie);
                let _ = sys::map_delete(self.maps.flows.as_fd(), cookie);
            }
        };
        let cookies = sys::socket_cookie(pair.client.as_fd())
            .and_then(|client| Ok((client, sys::socket_cookie(pair.member.as_fd())?)));
        let (client_cookie, member_cookie) = match cookies {
            Ok(cookies) => cookies,
            Err(error) => {
                tracing::warn!("offload setup failed ({error}); relaying this pair in userspace");
                return Err(pair);
            }
        };
        // Each setup returns what was written into the source's peer so far.
        let prepared = setup(client_cookie, member_cookie, &pair.member).and_then(|into_member| {
            Ok((
                into_member,
                setup(member_cookie, client_cookie, &pair.client)?,
            ))
        });
        let (into_member, into_client) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                tracing::warn!("offload setup failed ({error}); relaying this pair in userspace");
                forget(&[client_cookie, member_cookie]);
                return Err(pair);
            }
        };
        let insert = |stream: &TcpStream, cookie: u64| {
            let fd = std::os::fd::AsRawFd::as_raw_fd(stream) as u32;
            sys::map_update(self.maps.socks.as_fd(), &cookie, &fd, sys::BPF_NOEXIST).is_ok()
        };
        // A socket that already got a FIN cannot join (EOPNOTSUPP): the carrier relays that
        // direction itself. Bytes arriving while only one side is in the map are passed back.
        let client_in_map = insert(&pair.client, client_cookie);
        let member_in_map = insert(&pair.member, member_cookie);
        if !client_in_map && !member_in_map {
            forget(&[client_cookie, member_cookie]);
            return Err(pair);
        }
        // Bytes queued before the insertion wait for a data-ready call: setting SO_RCVLOWAT
        // makes one, so the verdict sees them (and trims what userspace already read).
        for (stream, in_map) in [(&pair.client, client_in_map), (&pair.member, member_in_map)] {
            if in_map && let Err(error) = sys::set_rcvlowat(stream.as_fd(), 1) {
                tracing::debug!("SO_RCVLOWAT after insertion: {error}");
            }
        }
        self.stats.pairs_offloaded.fetch_add(1, Ordering::Relaxed);
        self.stats.pairs_open.fetch_add(1, Ordering::Relaxed);
        let tunnel = Tunnel {
            sides: [
                Side::new(pair.client, client_cookie, client_in_map),
                Side::new(pair.member, member_cookie, member_in_map),
            ],
            flows: [
                Flow::new(into_member, pair.redirect_limit),
                Flow::new(into_client, pair.redirect_limit),
            ],
            lease: pair.lease,
            generation: 0,
            last_active_ns: sys::monotonic_ns(),
            relayed_seen: 0,
        };
        let _ = self.handoff.send(tunnel);
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            let _ = (&self.wake).write(&[1]);
        }
        Ok(())
    }

    /// Entries in (SOCKS, LINKS, FLOWS): all zero once every pair has closed.
    pub fn map_entries(&self) -> io::Result<(usize, usize, usize)> {
        Ok((
            sys::map_len::<u64>(self.maps.socks.as_fd())?,
            sys::map_len::<u64>(self.maps.links.as_fd())?,
            sys::map_len::<u64>(self.maps.flows.as_fd())?,
        ))
    }
}

struct Side {
    stream: TcpStream,
    cookie: u64,
    in_map: bool,
    /// Current epoll interest (0 before registration).
    interest: u32,
}

impl Side {
    fn new(stream: TcpStream, cookie: u64, in_map: bool) -> Self {
        Side {
            stream,
            cookie,
            in_map,
            interest: 0,
        }
    }
}

/// One direction: bytes read from `sides[i]` are written to `sides[1 - i]`.
struct Flow {
    /// Bytes read by userspace and not yet written to the peer.
    buffer: Vec<u8>,
    written_from: usize,
    /// Bytes userspace read from the source since hand-over.
    read: u64,
    /// Bytes userspace wrote into the peer since hand-over (LINKS.relayed).
    relayed: u64,
    /// Bytes written into the peer before hand-over.
    peer_base: u64,
    /// LINKS.limit for this direction.
    limit: u64,
    /// The verdict's counters as last read.
    kernel: BpfFlow,
    /// The redirected count for which the peer's psock queue was seen empty.
    verified_redirected: u64,
    source_eof: bool,
    peer_shut: bool,
    /// Since when the source has held bytes the verdict has not taken yet.
    unseen_since: Option<Instant>,
}

/// How long bytes may sit on an offloaded socket without the verdict taking them before the
/// pair is given up (each look wakes the verdict again).
const UNSEEN_LIMIT: Duration = Duration::from_secs(2);

impl Flow {
    fn new(peer_base: u64, limit: u64) -> Self {
        Flow {
            limit,
            buffer: Vec::new(),
            written_from: 0,
            read: 0,
            relayed: 0,
            peer_base,
            kernel: BpfFlow::default(),
            verified_redirected: 0,
            source_eof: false,
            peer_shut: false,
            unseen_since: None,
        }
    }
}

struct Tunnel {
    sides: [Side; 2],
    flows: [Flow; 2],
    /// Returns the member's live count to the balancer when the tunnel ends.
    lease: Lease,
    generation: u32,
    /// CLOCK_MONOTONIC ns of the latest byte either way, as of the last idle sweep.
    last_active_ns: u64,
    /// Bytes the carrier had relayed itself at the last idle sweep.
    relayed_seen: u64,
}

/// What a direction waits for after making all the progress it can.
#[derive(Debug, Default, Clone, Copy)]
struct Wants {
    readable: [bool; 2],
    writable: [bool; 2],
    drain_poll: bool,
    busy_poll: bool,
}

#[derive(Debug)]
enum Outcome {
    Open(Wants),
    Done,
    Abort(String),
}

struct Watcher {
    maps: Arc<Maps>,
    stats: Arc<OffloadStats>,
    epoll: sys::Epoll,
    wake: std::io::PipeReader,
    wake_pending: Arc<AtomicBool>,
    events: RingBuf<MapData>,
    handed: mpsc::Receiver<Tunnel>,
    next_generation: u32,
    pairs: Vec<Option<Tunnel>>,
    free: Vec<usize>,
    by_cookie: HashMap<u64, usize>,
    /// Pairs waiting for redirected bytes to leave a psock queue.
    draining: Vec<usize>,
    /// Pairs waiting for a slow peer's queue to shrink, and when they are due.
    busy: Vec<usize>,
    busy_due: std::time::Instant,
    idle_timeout: Option<Duration>,
    /// When the latest tunnel was handed over, until the memory is trimmed after it.
    last_handed: Option<std::time::Instant>,
}

/// How long hand-overs must pause before the memory their handshakes used is given back.
const TRIM_AFTER_QUIET: Duration = Duration::from_secs(1);

fn token(slot: usize, generation: u32, side: usize) -> u64 {
    (u64::from(generation) << 32) | ((slot as u64) << 1) | side as u64
}

impl Watcher {
    fn run(mut self) {
        let mut ready = Vec::new();
        let mut lost_seen = 0;
        let sweep_every = self
            .idle_timeout
            .map(|limit| (limit / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)));
        let mut next_sweep = std::time::Instant::now();
        let mut next_eviction_check = std::time::Instant::now();
        loop {
            if let (Some(limit), Some(every)) = (self.idle_timeout, sweep_every)
                && std::time::Instant::now() >= next_sweep
            {
                self.close_idle(limit);
                next_sweep = std::time::Instant::now() + every;
            }
            if std::time::Instant::now() >= next_eviction_check {
                self.close_evicted();
                next_eviction_check = std::time::Instant::now() + crate::relay::EVICTION_CHECK;
            }
            // A burst of connections leaves its handshakes' and trials' memory free in the
            // allocator, resident though nothing uses it; once the burst is over, give it
            // back, so a node's RSS follows the tunnels it holds.
            if self
                .last_handed
                .is_some_and(|at| at.elapsed() >= TRIM_AFTER_QUIET)
            {
                sys::release_free_memory();
                self.last_handed = None;
            }
            ready.clear();
            let now = std::time::Instant::now();
            let timeout = if !self.draining.is_empty() {
                Some(DRAIN_POLL)
            } else if !self.busy.is_empty() {
                Some(self.busy_due.saturating_duration_since(now))
            } else {
                Some(Duration::from_millis(100))
            };
            if let Err(error) = self.epoll.wait(&mut ready, timeout) {
                tracing::error!("offload carrier: epoll_wait failed: {error}");
                return;
            }
            let mut touched = std::mem::take(&mut self.draining);
            if !self.busy.is_empty() && std::time::Instant::now() >= self.busy_due {
                touched.append(&mut self.busy);
            }
            for event in &ready {
                tracing::trace!(token = event.token, events = event.events, "carrier event");
                match event.token {
                    WAKE_TOKEN => {
                        let mut sink = [0u8; 256];
                        let _ = self.wake.read(&mut sink);
                        // Cleared before draining: a tunnel sent after this writes again.
                        self.wake_pending.store(false, Ordering::Release);
                        if !self.adopt_handed() {
                            return; // every Sockmap handle is gone
                        }
                    }
                    EVENTS_TOKEN => {
                        while let Some(item) = self.events.next() {
                            let cookie = item
                                .get(..8)
                                .and_then(|bytes| bytes.try_into().ok())
                                .map(u64::from_ne_bytes);
                            if let Some(&slot) = cookie.and_then(|c| self.by_cookie.get(&c)) {
                                touched.push(slot);
                            }
                        }
                        // A full ring buffer loses pass events: then look at every pair once.
                        // Losses happen only while records wait unread, so checking after
                        // each drain misses none.
                        let lost = sys::map_lookup::<u32, u64>(self.maps.counters.as_fd(), &0)
                            .ok()
                            .flatten()
                            .unwrap_or(0);
                        if lost != lost_seen {
                            lost_seen = lost;
                            touched.extend(self.by_cookie.values().copied());
                        }
                    }
                    token => {
                        let slot = ((token & 0xffff_ffff) >> 1) as usize;
                        let generation = (token >> 32) as u32;
                        let live = self.pairs.get(slot).and_then(Option::as_ref);
                        if live.is_some_and(|t| t.generation == generation) {
                            if event.events & sys::EPOLLERR != 0 {
                                let side = (token & 1) as usize;
                                let error = live
                                    .and_then(|t| t.sides[side].stream.take_error().ok().flatten())
                                    .map_or_else(|| "unknown".to_string(), |e| e.to_string());
                                let name = ["client", "member"][side];
                                self.finish(slot, Some(format!("{name} socket error: {error}")));
                            } else {
                                touched.push(slot);
                            }
                        }
                    }
                }
            }
            touched.sort_unstable();
            touched.dedup();
            for slot in touched {
                self.progress(slot);
            }
        }
    }

    /// Registers tunnels sent by the workers; false when the senders are gone.
    fn adopt_handed(&mut self) -> bool {
        loop {
            match self.handed.try_recv() {
                Ok(mut tunnel) => {
                    let slot = self.free.pop().unwrap_or_else(|| {
                        self.pairs.push(None);
                        self.pairs.len() - 1
                    });
                    self.next_generation = self.next_generation.wrapping_add(1);
                    tunnel.generation = self.next_generation;
                    for side in &tunnel.sides {
                        self.by_cookie.insert(side.cookie, slot);
                    }
                    self.pairs[slot] = Some(tunnel);
                    self.last_handed = Some(std::time::Instant::now());
                    // Bytes passed before registration produced events nobody caught.
                    self.progress(slot);
                }
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn progress(&mut self, slot: usize) {
        let Some(tunnel) = self.pairs.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let outcome = advance(tunnel, &self.maps, &self.stats);
        tracing::trace!(slot, ?outcome, "carrier progress");
        match outcome {
            Outcome::Open(wants) => {
                let generation = tunnel.generation;
                for (index, side) in tunnel.sides.iter_mut().enumerate() {
                    let mut interest = sys::EPOLLRDHUP | sys::EPOLLET;
                    if wants.readable[index] {
                        interest |= sys::EPOLLIN;
                    }
                    if wants.writable[index] {
                        interest |= sys::EPOLLOUT;
                    }
                    if interest == side.interest {
                        continue;
                    }
                    let registered = if side.interest == 0 {
                        self.epoll.add(
                            side.stream.as_fd(),
                            interest,
                            token(slot, generation, index),
                        )
                    } else {
                        self.epoll.modify(
                            side.stream.as_fd(),
                            interest,
                            token(slot, generation, index),
                        )
                    };
                    match registered {
                        Ok(()) => side.interest = interest,
                        Err(error) => {
                            self.finish(slot, Some(format!("epoll registration: {error}")));
                            return;
                        }
                    }
                }
                if wants.drain_poll {
                    self.draining.push(slot);
                } else if wants.busy_poll {
                    if self.busy.is_empty() {
                        self.busy_due =
                            std::time::Instant::now() + busy_poll(self.by_cookie.len() / 2);
                    }
                    self.busy.push(slot);
                }
            }
            Outcome::Done => self.finish(slot, None),
            Outcome::Abort(reason) => self.finish(slot, Some(reason)),
        }
    }

    /// Removes every trace of the tunnel and closes both sockets.
    /// Closes the pairs with no byte either way for `limit`: the verdict's last skb time per
    /// direction, and the carrier's own relaying, say when bytes last moved.
    fn close_idle(&mut self, limit: Duration) {
        let now = sys::monotonic_ns();
        let limit_ns = limit.as_nanos() as u64;
        let mut idle = Vec::new();
        for (slot, tunnel) in self.pairs.iter_mut().enumerate() {
            let Some(tunnel) = tunnel else { continue };
            for side in &tunnel.sides {
                if let Ok(Some(counters)) =
                    sys::map_lookup::<u64, BpfFlow>(self.maps.flows.as_fd(), &side.cookie)
                {
                    tunnel.last_active_ns = tunnel.last_active_ns.max(counters.last_ns);
                }
            }
            let relayed = tunnel.flows[0].read + tunnel.flows[1].read;
            if relayed != tunnel.relayed_seen {
                tunnel.relayed_seen = relayed;
                tunnel.last_active_ns = now;
            }
            if now.saturating_sub(tunnel.last_active_ns) >= limit_ns {
                idle.push(slot);
            }
        }
        for slot in idle {
            self.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
            self.finish(slot, Some(format!("idle for {limit:?}")));
        }
    }

    /// Closes the pairs whose member was marked down with `shutdown_sessions`.
    fn close_evicted(&mut self) {
        let evicted: Vec<usize> = (0..self.pairs.len())
            .filter(|&slot| {
                self.pairs[slot]
                    .as_ref()
                    .is_some_and(|tunnel| tunnel.lease.evicted())
            })
            .collect();
        for slot in evicted {
            self.finish(slot, Some("its member was marked down".into()));
        }
    }

    fn finish(&mut self, slot: usize, abort: Option<String>) {
        let Some(tunnel) = self.pairs.get_mut(slot).and_then(Option::take) else {
            return;
        };
        if let Some(reason) = &abort {
            tracing::debug!("offloaded pair aborted: {reason}");
            self.stats.pairs_aborted.fetch_add(1, Ordering::Relaxed);
        }
        // The epoll registrations go with the sockets: nothing else holds their descriptors.
        let mut moved = 0;
        for (side, flow) in tunnel.sides.iter().zip(&tunnel.flows) {
            moved += flow.relayed;
            self.by_cookie.remove(&side.cookie);
            // After the source's EOF the verdict sees nothing more: the last lookup is final.
            let counters = if flow.source_eof {
                Some(flow.kernel)
            } else {
                sys::map_lookup::<u64, BpfFlow>(self.maps.flows.as_fd(), &side.cookie)
                    .ok()
                    .flatten()
            };
            if let Some(counters) = counters {
                moved += counters.redirected;
                self.stats
                    .bytes_redirected
                    .fetch_add(counters.redirected, Ordering::Relaxed);
                self.stats
                    .bytes_trimmed
                    .fetch_add(counters.trimmed, Ordering::Relaxed);
            }
            // SOCKS needs no delete: closing a socket takes it out of the sockhash.
            let _ = sys::map_delete(self.maps.links.as_fd(), &side.cookie);
            let _ = sys::map_delete(self.maps.flows.as_fd(), &side.cookie);
        }
        if abort.is_some() {
            // Tell both ends at once rather than leaving one waiting on a dead peer.
            for side in &tunnel.sides {
                let _ = side.stream.shutdown(Shutdown::Both);
            }
        }
        tunnel.lease.record_traffic(moved);
        self.free.push(slot);
        self.stats.pairs_open.fetch_sub(1, Ordering::Relaxed);
        drop(tunnel);
    }
}

/// Whether every byte redirected from the source has left the peer's psock queue for the
/// peer's socket: bytes ever written into the peer >= what userspace gave it + what was
/// redirected to it.
fn pushed_through(flow: &Flow, peer: BorrowedFd) -> io::Result<bool> {
    let expected = flow.peer_base + flow.relayed + flow.kernel.redirected;
    Ok(sys::bytes_written(peer)? >= expected)
}

/// Moves every direction of a tunnel as far as it can go without blocking.
fn advance(tunnel: &mut Tunnel, maps: &Maps, stats: &OffloadStats) -> Outcome {
    let mut wants = Wants::default();
    for from in 0..2 {
        let to = 1 - from;
        let [first, second] = &tunnel.sides;
        let (source, peer) = if from == 0 {
            (first, second)
        } else {
            (second, first)
        };
        let flow = &mut tunnel.flows[from];
        if flow.peer_shut {
            continue;
        }
        let step = if source.in_map {
            relay_passed(flow, source, peer, maps, stats)
        } else {
            relay_plain(flow, source, peer, stats)
        };
        match step {
            Ok(Wait::Nothing) => {}
            Ok(Wait::Readable) => wants.readable[from] = true,
            Ok(Wait::Writable) => wants.writable[to] = true,
            Ok(Wait::Drain) => {
                wants.drain_poll = true;
                continue;
            }
            Ok(Wait::Busy) => {
                wants.busy_poll = true;
                continue;
            }
            Err(reason) => return Outcome::Abort(reason),
        }
        // FIN: pass it on after the last byte, redirected or relayed, is in the peer socket.
        if flow.source_eof && flow.written_from == flow.buffer.len() {
            if source.in_map {
                match pushed_through(flow, peer.stream.as_fd()) {
                    Ok(true) => {}
                    Ok(false) => {
                        wants.drain_poll = true;
                        continue;
                    }
                    Err(error) => return Outcome::Abort(format!("peer counters: {error}")),
                }
            }
            match peer.stream.shutdown(Shutdown::Write) {
                Ok(()) => flow.peer_shut = true,
                Err(error) if error.kind() == io::ErrorKind::NotConnected => flow.peer_shut = true,
                Err(error) => return Outcome::Abort(format!("shutdown peer: {error}")),
            }
        }
    }
    if tunnel.flows.iter().all(|flow| flow.peer_shut) {
        Outcome::Done
    } else {
        Outcome::Open(wants)
    }
}

/// What a direction waits for before it can move again.
enum Wait {
    Nothing,
    Readable,
    Writable,
    /// Redirected bytes are still leaving the peer's psock queue: look again very soon.
    Drain,
    /// The peer's receiver is behind: look again later.
    Busy,
}

/// A source in the sockmap: relay what the verdict passed back, in order, so redirection can
/// resume. Never reads past the `passed` count of the latest FLOWS lookup (bytes passed later
/// may follow bytes redirected later), and never writes before every byte redirected ahead of
/// them has reached the peer's socket. The bytes are peeked, written, published as relayed,
/// and only then consumed: consuming opens the source's TCP window, and by then the verdict
/// already knows userspace has caught up, so new bytes are redirected again.
fn relay_passed(
    flow: &mut Flow,
    source: &Side,
    peer: &Side,
    maps: &Maps,
    stats: &OffloadStats,
) -> Result<Wait, String> {
    // The verdict counts a passed skb before queueing it, so a peek can see bytes a lookup
    // just missed: one fresh lookup decides.
    let mut looked_again = false;
    let lookup = || match sys::map_lookup::<u64, BpfFlow>(maps.flows.as_fd(), &source.cookie) {
        Ok(Some(kernel)) => Ok(kernel),
        Ok(None) => Err("flow entry vanished".to_string()),
        Err(error) => Err(format!("FLOWS lookup: {error}")),
    };
    loop {
        // A lookup copies the counters without a lock: `passed` from one lookup and
        // `redirected` from a later one, so every redirect ahead of a passed byte is counted.
        let passed = lookup()?.passed;
        flow.kernel = lookup()?;
        flow.kernel.passed = passed;
        if flow.kernel.broken != 0 {
            return Err(
                "a retransmission overlapped forwarded bytes and could not be trimmed".into(),
            );
        }
        let owed = flow.kernel.passed.saturating_sub(flow.read);
        if owed > 0 {
            flow.unseen_since = None;
        }
        if owed == 0 {
            if flow.source_eof {
                return Ok(Wait::Nothing);
            }
            // Nothing owed: only a FIN can be waiting.
            return match source.stream.peek(&mut [0u8; 1]) {
                Ok(0) => {
                    // Bytes may have been redirected or passed between the lookup and the
                    // FIN: look once more, so the counters the FIN waits for are final.
                    flow.source_eof = true;
                    continue;
                }
                Ok(_) if !looked_again => {
                    looked_again = true;
                    continue;
                }
                // Bytes the verdict has not taken yet (a data-ready call still to come): wake
                // it and look again soon; only bytes that stay unseen end the pair.
                Ok(_) => {
                    let since = *flow.unseen_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > UNSEEN_LIMIT {
                        return Err(format!(
                            "bytes on an offloaded socket that the verdict did not take for {UNSEEN_LIMIT:?}"
                        ));
                    }
                    let _ = sys::set_rcvlowat(source.stream.as_fd(), 1);
                    Ok(Wait::Drain)
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    flow.unseen_since = None;
                    Ok(Wait::Nothing)
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => Err(format!("read from source: {error}")),
            };
        }
        if flow.verified_redirected != flow.kernel.redirected {
            match pushed_through(flow, peer.stream.as_fd()) {
                Ok(true) => flow.verified_redirected = flow.kernel.redirected,
                Ok(false) => return Ok(Wait::Drain),
                Err(error) => return Err(format!("peer counters: {error}")),
            }
        }
        // Relay a round only when the peer's queue leaves room for all of it under half the
        // limit, so the redirect path has room once the round is published.
        let queued =
            sys::unacked_send_queue(peer.stream.as_fd()).map_err(|e| format!("peer queue: {e}"))?;
        if queued > 0 && queued + owed > flow.limit / 2 {
            return Ok(Wait::Busy);
        }
        // Short copies: the socket stays locked while userspace reads it, and a locked socket
        // drops what overflows its backlog.
        let mut buffer = vec![0u8; owed.min(4 * RELAY_CHUNK as u64) as usize];
        let peeked = match source.stream.peek(&mut buffer) {
            Ok(0) => return Ok(Wait::Readable), // counted, not yet queued
            Ok(count) => count,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(Wait::Readable),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(format!("read from source: {error}")),
        };
        let written = match (&peer.stream).write(&buffer[..peeked]) {
            Ok(written) => written,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(Wait::Writable),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(format!("write to peer: {error}")),
        };
        flow.relayed += written as u64;
        stats
            .bytes_relayed
            .fetch_add(written as u64, Ordering::Relaxed);
        let link = BpfLink {
            peer_cookie: peer.cookie,
            limit: flow.limit,
            peer_base: flow.peer_base,
            relayed: flow.relayed,
        };
        sys::map_update(maps.links.as_fd(), &source.cookie, &link, sys::BPF_ANY)
            .map_err(|error| format!("LINKS update: {error}"))?;
        // Consume exactly what was written; those bytes are at the head of the queue.
        let mut left = written;
        while left > 0 {
            match (&source.stream).read(&mut buffer[..left]) {
                Ok(0) => return Err("source ended inside bytes it had queued".into()),
                Ok(count) => left -= count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(format!("consume relayed bytes: {error}")),
            }
        }
        flow.read += written as u64;
    }
}

/// A source outside the sockmap (it was already closing at hand-over): plain relay.
fn relay_plain(
    flow: &mut Flow,
    source: &Side,
    peer: &Side,
    stats: &OffloadStats,
) -> Result<Wait, String> {
    loop {
        if flow.written_from < flow.buffer.len() {
            match (&peer.stream).write(&flow.buffer[flow.written_from..]) {
                Ok(written) => {
                    flow.written_from += written;
                    flow.relayed += written as u64;
                    stats
                        .bytes_relayed
                        .fetch_add(written as u64, Ordering::Relaxed);
                    continue;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(Wait::Writable);
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(format!("write to peer: {error}")),
            }
        }
        // Everything read is written: idle pairs keep no relay buffer.
        flow.buffer = Vec::new();
        flow.written_from = 0;
        if flow.source_eof {
            return Ok(Wait::Nothing);
        }
        let mut buffer = vec![0u8; RELAY_CHUNK];
        match (&source.stream).read(&mut buffer) {
            Ok(0) => flow.source_eof = true,
            Ok(count) => {
                buffer.truncate(count);
                flow.read += count as u64;
                flow.buffer = buffer;
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(Wait::Readable),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(format!("read from source: {error}")),
        }
    }
}

/// Verifier logs span many lines; the start-up line keeps the first.
fn first_line(text: String) -> String {
    text.lines().next().unwrap_or_default().to_string()
}
