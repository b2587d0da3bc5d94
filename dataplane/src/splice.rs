//! The kernel TLS carrier: a pair with a kernel TLS leg (the kernel decrypts what it reads and
//! encrypts what it sends) is carried by splice(2) through a pipe per direction, driven by one
//! io_uring on its own thread, so payload moves between socket and pipe pages and never enters
//! userspace. A direction waits for its source with a poll, fills its pipe from the source,
//! drains the pipe into the destination (waiting for room when the destination is full) and
//! passes the end on after its last byte: close_notify first when the destination speaks
//! kernel TLS, then the FIN. Pipes are lent from a pool only while bytes are in flight, so an
//! idle pair holds its two sockets and nothing more.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use crate::balancer::Lease;
use crate::relay::EVICTION_CHECK;
use crate::sys::{self, uring::FdRing};

/// Bytes one splice moves at most (kernel TLS hands out one record, 16 KiB, per call).
const CHUNK: u32 = 64 * 1024;
/// Empty pipes kept for the next direction that has bytes to move.
const POOLED_PIPES: usize = 256;
const RING_ENTRIES: u32 = 1024;
/// Splices one direction runs in a row before it lets the other pairs have the thread.
const INLINE_SPLICES: u32 = 32;
const WAKE_TAG: u64 = u64::MAX;
/// The largest TLS record's plaintext: room for any control record the peer sends.
const MAX_RECORD_PLAINTEXT: usize = 1 << 14;
const POLLIN: u32 = libc::POLLIN as u32;
const POLLOUT: u32 = libc::POLLOUT as u32;
const POLLRDHUP: u32 = libc::POLLRDHUP as u32;

/// One socket of a pair handed to the carrier.
#[derive(Debug)]
pub struct Leg {
    pub socket: TcpStream,
    /// Kernel TLS on this socket, with rustls's key schedule for the peer's key updates: its
    /// peer's close_notify ends it, and it sends one before its FIN.
    pub kernel_tls: Option<crate::tls::KernelKeys>,
    /// Its peer already ended (a close_notify read before the hand-over).
    pub ended: bool,
}

/// An established pair for the carrier: client first, member second.
#[derive(Debug)]
pub struct SplicePair {
    pub client: Leg,
    pub member: Leg,
    pub lease: Lease,
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct SpliceStats {
    /// Pairs taken since start.
    pub pairs: AtomicU64,
    /// Pairs carried now.
    pub open_pairs: AtomicU64,
    /// Bytes spliced from a pipe into a destination socket.
    pub spliced_bytes: AtomicU64,
    /// Splices that moved bytes (both halves: source -> pipe and pipe -> destination).
    pub splices: AtomicU64,
    /// Legs taken with kernel TLS on them (TCP_ULP "tls", keys in the kernel).
    pub kernel_tls_legs: AtomicU64,
    /// Pairs closed for being idle longer than `idle_timeout`.
    pub idle_closed: AtomicU64,
    /// TLS 1.3 key updates followed (a new receive key given to the kernel).
    pub key_updates: AtomicU64,
}

/// The carrier thread's front: pairs are queued here and the thread woken.
#[derive(Debug)]
pub struct SpliceCarrier {
    handoff: mpsc::Sender<SplicePair>,
    wake: io::PipeWriter,
    /// Set while a wake byte is unread: a burst of hand-overs costs one write and one wake-up.
    wake_pending: Arc<AtomicBool>,
    pub stats: Arc<SpliceStats>,
}

impl SpliceCarrier {
    /// Sets up the ring and starts the carrier thread; the error says why it cannot run. A
    /// pair with no byte either way for `idle_timeout` is closed.
    pub fn start(idle_timeout: Option<Duration>) -> Result<SpliceCarrier, String> {
        let ring = FdRing::new(RING_ENTRIES).map_err(|error| format!("io_uring: {error}"))?;
        let (wake_reader, wake) = io::pipe().map_err(|error| format!("pipe: {error}"))?;
        let (handoff, handed) = mpsc::channel();
        let stats = Arc::new(SpliceStats::default());
        let wake_pending = Arc::new(AtomicBool::new(false));
        let carrier = Carrier {
            ring,
            handed,
            wake: wake_reader,
            wake_pending: Arc::clone(&wake_pending),
            stats: Arc::clone(&stats),
            pairs: Vec::new(),
            free_slots: Vec::new(),
            pipes: Vec::new(),
            control: vec![0; MAX_RECORD_PLAINTEXT + 256].into_boxed_slice(),
            idle_timeout,
        };
        std::thread::Builder::new()
            .name("wsplice-splice".into())
            .spawn(move || carrier.run())
            .map_err(|error| format!("cannot start the splice thread: {error}"))?;
        Ok(SpliceCarrier {
            handoff,
            wake,
            wake_pending,
            stats,
        })
    }

    /// Gives a pair to the carrier; it is closed when both directions have ended.
    pub fn carry(&self, pair: SplicePair) {
        if self.handoff.send(pair).is_err() {
            tracing::error!("the splice thread has stopped; pair closed");
            return;
        }
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            let _ = (&self.wake).write_all(&[1]);
        }
    }
}

/// Where one direction stands. Direction 0 reads the client and writes the member, 1 the
/// reverse; the direction's index is its source leg's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    AwaitReadable,
    /// Source -> pipe. `polled`: the source was just reported readable; `blocking`: wait in
    /// the kernel for the rest of a TLS record whose first bytes made the source readable.
    Fill {
        polled: bool,
        blocking: bool,
    },
    /// Pipe -> destination.
    Drain,
    AwaitWritable,
    /// The source ended: pass close_notify (kernel TLS) and the FIN on.
    Ending,
    Done,
}

struct Pipe {
    reader: OwnedFd,
    writer: OwnedFd,
}

struct Direction {
    step: Step,
    pipe: Option<Pipe>,
    in_pipe: u32,
    in_flight: bool,
}

struct Carried {
    legs: [Leg; 2],
    directions: [Direction; 2],
    failed: bool,
    /// Bytes spliced into either destination.
    moved: u64,
    /// When a byte last moved (or the pair arrived).
    last_active: Instant,
    lease: Lease,
}

struct Carrier {
    ring: FdRing,
    handed: mpsc::Receiver<SplicePair>,
    wake: io::PipeReader,
    wake_pending: Arc<AtomicBool>,
    stats: Arc<SpliceStats>,
    /// A pair's slot stays taken until neither direction has an operation in flight, so a
    /// completion's tag (slot, direction) always names the pair it was issued for.
    pairs: Vec<Option<Carried>>,
    free_slots: Vec<usize>,
    pipes: Vec<Pipe>,
    /// Where a control record (an alert, a handshake message) is read into.
    control: Box<[u8]>,
    idle_timeout: Option<Duration>,
}

fn tag(slot: usize, index: usize) -> u64 {
    ((slot as u64) << 1) | index as u64
}

fn errno(result: i32) -> io::Error {
    io::Error::from_raw_os_error(-result)
}

impl Carrier {
    fn run(mut self) {
        let mut completions = Vec::new();
        if let Err(error) = self.ring.poll(WAKE_TAG, self.wake.as_raw_fd(), POLLIN) {
            tracing::error!("splice thread: io_uring poll: {error}");
            return;
        }
        // Idle pairs are looked for a few times per timeout, evicted ones twice a second.
        let sweep_every = self.idle_timeout.map_or(EVICTION_CHECK, |limit| {
            (limit / 4).clamp(Duration::from_millis(10), EVICTION_CHECK)
        });
        let mut next_sweep = Instant::now();
        loop {
            if let Err(error) = self.ring.submit_and_wait(Some(sweep_every)) {
                tracing::error!("splice thread: io_uring: {error}; pairs left as they are");
                return;
            }
            if Instant::now() >= next_sweep {
                self.close_idle_and_evicted();
                next_sweep = Instant::now() + sweep_every;
            }
            completions.clear();
            self.ring.reap(&mut completions);
            for &(tag, result) in &completions {
                if tag == WAKE_TAG {
                    if !self.take_new_pairs() {
                        return;
                    }
                } else {
                    self.complete((tag >> 1) as usize, (tag & 1) as usize, result);
                }
            }
        }
    }

    /// Takes the queued pairs and waits for the next wake byte; false when the front is gone.
    fn take_new_pairs(&mut self) -> bool {
        let mut byte = [0u8; 64];
        if let Ok(0) | Err(_) = self.wake.read(&mut byte) {
            return false; // every sender dropped: the server has stopped
        }
        // Cleared after the read and before draining: a pair sent after this writes again
        // (cleared first, a byte written before the read would be taken for this round's
        // while the flag stayed set, and no pair would ever wake the thread again).
        self.wake_pending.store(false, Ordering::Release);
        while let Ok(pair) = self.handed.try_recv() {
            self.add(pair);
        }
        if let Err(error) = self.ring.poll(WAKE_TAG, self.wake.as_raw_fd(), POLLIN) {
            tracing::error!("splice thread: io_uring poll: {error}");
            return false;
        }
        true
    }

    fn add(&mut self, pair: SplicePair) {
        self.stats.pairs.fetch_add(1, Ordering::Relaxed);
        self.stats.open_pairs.fetch_add(1, Ordering::Relaxed);
        // Counted from the socket itself: the kernel names its upper layer "tls".
        let kernel_tls_legs = [&pair.client, &pair.member]
            .iter()
            .filter(|leg| {
                leg.kernel_tls.is_some()
                    && sys::tcp_ulp(leg.socket.as_fd()).is_ok_and(|ulp| ulp == "tls")
            })
            .count() as u64;
        self.stats
            .kernel_tls_legs
            .fetch_add(kernel_tls_legs, Ordering::Relaxed);
        let direction = |source: &Leg| Direction {
            step: if source.ended {
                Step::Ending
            } else {
                Step::AwaitReadable
            },
            pipe: None,
            in_pipe: 0,
            in_flight: false,
        };
        let carried = Carried {
            directions: [direction(&pair.client), direction(&pair.member)],
            legs: [pair.client, pair.member],
            failed: false,
            moved: 0,
            last_active: Instant::now(),
            lease: pair.lease,
        };
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.pairs[slot] = Some(carried);
                slot
            }
            None => {
                self.pairs.push(Some(carried));
                self.pairs.len() - 1
            }
        };
        self.advance(slot, 0);
        self.advance(slot, 1);
        self.release_if_ended(slot);
    }

    /// Applies a completion to its direction and issues the next operation.
    fn complete(&mut self, slot: usize, index: usize, result: i32) {
        let Some(pair) = self.pairs.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let direction = &mut pair.directions[index];
        direction.in_flight = false;
        if pair.failed {
            direction.step = Step::Done;
            self.release_if_ended(slot);
            return;
        }
        match transition(pair, index, result, &self.stats, &mut self.control) {
            Ok(step) => {
                pair.directions[index].step = step;
                self.advance(slot, index);
            }
            Err(why) => self.fail(slot, &why),
        }
        self.release_if_ended(slot);
    }

    /// Runs the direction until it has to wait: splices that cannot block run here, on this
    /// thread (a splice through io_uring would be handed to one of its worker threads); waits
    /// are io_uring polls. A busy direction yields after a bounded run, so one fast pair does
    /// not hold the thread.
    fn advance(&mut self, slot: usize, index: usize) {
        let mut inline_splices = 0;
        loop {
            let Some(pair) = self.pairs[slot].as_mut() else {
                return;
            };
            let direction = &mut pair.directions[index];
            if direction.in_flight || pair.failed {
                return;
            }
            // An idle direction's empty pipe goes back to the pool until bytes come again.
            if direction.step == Step::AwaitReadable
                && direction.in_pipe == 0
                && let Some(pipe) = direction.pipe.take()
                && self.pipes.len() < POOLED_PIPES
            {
                self.pipes.push(pipe);
            }
            if matches!(
                direction.step,
                Step::Fill {
                    blocking: false,
                    ..
                }
            ) && inline_splices >= INLINE_SPLICES
            {
                direction.step = Step::AwaitReadable;
            }
            // A KeyUpdate the destination's peer asked for goes out before the next data.
            if direction.step == Step::Drain
                && let Some(keys) = pair.legs[1 - index].kernel_tls.as_mut()
                && keys.answer_owed()
            {
                match keys.answer_key_update(pair.legs[1 - index].socket.as_fd()) {
                    Ok(()) => {}
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        direction.step = Step::AwaitWritable;
                        continue;
                    }
                    Err(error) => {
                        self.fail(slot, &format!("answering a key update: {error}"));
                        return;
                    }
                }
            }
            let source = pair.legs[index].socket.as_fd();
            let destination = &pair.legs[1 - index];
            let tag = tag(slot, index);
            let result = match direction.step {
                Step::Fill { blocking, .. } => {
                    let pipe = match direction.pipe.take().or_else(|| self.pipes.pop()) {
                        Some(pipe) => pipe,
                        None => match new_pipe() {
                            Ok(pipe) => pipe,
                            Err(error) => {
                                self.fail(slot, &format!("pipe: {error}"));
                                return;
                            }
                        },
                    };
                    let writer = pipe.writer.as_raw_fd();
                    let moved = (!blocking).then(|| {
                        sys::splice_nonblocking(source, pipe.writer.as_fd(), CHUNK as usize)
                    });
                    direction.pipe = Some(pipe);
                    match moved {
                        Some(moved) => moved,
                        // The rest of a TLS record is on its way: wait in the kernel for it.
                        None => {
                            let issued =
                                self.ring
                                    .splice(tag, source.as_raw_fd(), writer, CHUNK, false);
                            self.issued(slot, index, issued);
                            return;
                        }
                    }
                }
                Step::Drain => match &direction.pipe {
                    Some(pipe) => sys::splice_nonblocking(
                        pipe.reader.as_fd(),
                        destination.socket.as_fd(),
                        direction.in_pipe as usize,
                    ),
                    None => Err(io::Error::other("no pipe to drain")),
                },
                Step::AwaitReadable => {
                    let issued = self.ring.poll(tag, source.as_raw_fd(), POLLIN | POLLRDHUP);
                    self.issued(slot, index, issued);
                    return;
                }
                Step::AwaitWritable => {
                    let issued = self.ring.poll(tag, destination.socket.as_raw_fd(), POLLOUT);
                    self.issued(slot, index, issued);
                    return;
                }
                Step::Ending => match pass_end_on(destination) {
                    Ok(()) => {
                        direction.step = Step::Done;
                        return;
                    }
                    // No room for the close_notify yet.
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        let fd = destination.socket.as_raw_fd();
                        let issued = self.ring.poll(tag, fd, POLLOUT);
                        self.issued(slot, index, issued);
                        return;
                    }
                    Err(error) => {
                        self.fail(slot, &format!("passing the end on: {error}"));
                        return;
                    }
                },
                Step::Done => return,
            };
            inline_splices += 1;
            let result = match result {
                Ok(moved) => moved as i32,
                Err(error) => -error.raw_os_error().unwrap_or(libc::EIO),
            };
            match transition(pair, index, result, &self.stats, &mut self.control) {
                Ok(step) => pair.directions[index].step = step,
                Err(why) => {
                    self.fail(slot, &why);
                    return;
                }
            }
        }
    }

    /// Marks an operation in flight, or ends the pair when it could not be queued.
    fn issued(&mut self, slot: usize, index: usize, issued: io::Result<()>) {
        match issued {
            Ok(()) => {
                if let Some(pair) = self.pairs[slot].as_mut() {
                    pair.directions[index].in_flight = true;
                }
            }
            Err(error) => self.fail(slot, &format!("io_uring: {error}")),
        }
    }

    /// Closes the pairs that moved no byte for `idle_timeout`, and those whose member was
    /// marked down with `shutdown_sessions`.
    fn close_idle_and_evicted(&mut self) {
        let limit = self.idle_timeout;
        let ending: Vec<(usize, &'static str)> = (0..self.pairs.len())
            .filter_map(|slot| {
                let pair = self.pairs[slot].as_ref().filter(|pair| !pair.failed)?;
                if pair.lease.evicted() {
                    Some((slot, "its member was marked down"))
                } else if limit.is_some_and(|limit| pair.last_active.elapsed() >= limit) {
                    Some((slot, "idle"))
                } else {
                    None
                }
            })
            .collect();
        for (slot, why) in ending {
            if why == "idle" {
                self.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
            }
            self.fail(slot, why);
            self.release_if_ended(slot);
        }
    }

    /// Ends both sides now: operations in flight complete (the shutdown wakes them), and the
    /// pair is closed when the last one has.
    fn fail(&mut self, slot: usize, why: &str) {
        let Some(pair) = self.pairs[slot].as_mut() else {
            return;
        };
        tracing::debug!("spliced pair ended early: {why}");
        pair.failed = true;
        for leg in &pair.legs {
            let _ = leg.socket.shutdown(Shutdown::Both);
        }
        for direction in &mut pair.directions {
            if !direction.in_flight {
                direction.step = Step::Done;
            }
        }
    }

    /// Closes the pair once both directions are done and nothing is in flight.
    fn release_if_ended(&mut self, slot: usize) {
        let ended = self.pairs[slot].as_ref().is_some_and(|pair| {
            pair.directions
                .iter()
                .all(|d| d.step == Step::Done && !d.in_flight)
        });
        if !ended {
            return;
        }
        if let Some(mut pair) = self.pairs[slot].take() {
            pair.lease.record_traffic(pair.moved);
            for direction in &mut pair.directions {
                // A failed pair's pipe may still hold bytes: only empty ones are reused.
                if direction.in_pipe == 0
                    && let Some(pipe) = direction.pipe.take()
                    && self.pipes.len() < POOLED_PIPES
                {
                    self.pipes.push(pipe);
                }
            }
        }
        self.free_slots.push(slot);
        self.stats.open_pairs.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where a direction goes from `result` (bytes moved, 0, or -errno) of its current step.
fn transition(
    pair: &mut Carried,
    index: usize,
    result: i32,
    stats: &SpliceStats,
    control: &mut [u8],
) -> Result<Step, String> {
    let source = &mut pair.legs[index];
    let direction = &mut pair.directions[index];
    match (direction.step, result) {
        (_, result) if result == -libc::EINTR => Ok(direction.step),
        (Step::AwaitReadable, result) if result >= 0 => Ok(Step::Fill {
            polled: true,
            blocking: false,
        }),
        (Step::AwaitWritable, result) if result >= 0 => Ok(Step::Drain),
        (Step::Ending, result) if result >= 0 => Ok(Step::Ending),
        (Step::Fill { .. }, moved) if moved > 0 => {
            pair.last_active = Instant::now();
            stats.splices.fetch_add(1, Ordering::Relaxed);
            direction.in_pipe = moved as u32;
            Ok(Step::Drain)
        }
        (Step::Fill { .. }, 0) => Ok(Step::Ending),
        // Readable, yet no whole record: wait for the rest inside the kernel.
        (Step::Fill { polled: true, .. }, result)
            if result == -libc::EAGAIN && source.kernel_tls.is_some() =>
        {
            Ok(Step::Fill {
                polled: false,
                blocking: true,
            })
        }
        (Step::Fill { .. }, result) if result == -libc::EAGAIN => Ok(Step::AwaitReadable),
        // The next record is not application data (kernel TLS splices only data).
        (Step::Fill { .. }, result) if result == -libc::EINVAL && source.kernel_tls.is_some() => {
            read_control_record(source, control, stats)
        }
        (Step::Drain, moved) if moved > 0 => {
            pair.moved += moved as u64;
            stats.splices.fetch_add(1, Ordering::Relaxed);
            stats
                .spliced_bytes
                .fetch_add(moved as u64, Ordering::Relaxed);
            direction.in_pipe -= (moved as u32).min(direction.in_pipe);
            if direction.in_pipe > 0 {
                Ok(Step::Drain)
            } else {
                Ok(Step::Fill {
                    polled: false,
                    blocking: false,
                })
            }
        }
        (Step::Drain, result) if result == -libc::EAGAIN => Ok(Step::AwaitWritable),
        (Step::Drain, 0) => Err("splice from a pipe with bytes in it moved none".into()),
        (step, result) => Err(format!("{step:?}: {}", errno(result))),
    }
}

fn new_pipe() -> io::Result<Pipe> {
    let (reader, writer) = io::pipe()?;
    Ok(Pipe {
        reader: reader.into(),
        writer: writer.into(),
    })
}

/// Sends close_notify where the destination speaks kernel TLS, then the FIN.
fn pass_end_on(destination: &Leg) -> io::Result<()> {
    if destination.kernel_tls.is_some() {
        match sys::ktls_send_close_notify(destination.socket.as_fd()) {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Err(error),
            // A peer that is gone needs no notice; its FIN below fails the same way.
            _ => {}
        }
    }
    match destination.socket.shutdown(Shutdown::Write) {
        Err(error) if error.kind() != io::ErrorKind::NotConnected => Err(error),
        _ => Ok(()),
    }
}

/// The source's next record is not application data: a close_notify ends the direction, a
/// record of another kind ends the pair. Peeked first, so a data record that raced in is left
/// for the next splice.
fn read_control_record(
    source: &mut Leg,
    buffer: &mut [u8],
    stats: &SpliceStats,
) -> Result<Step, String> {
    let fd = source.socket.as_fd();
    let peeked = sys::ktls_recv(fd, buffer, libc::MSG_PEEK | libc::MSG_DONTWAIT);
    match peeked {
        Ok(sys::KtlsRecord::Data(_)) => Ok(Step::Fill {
            polled: false,
            blocking: false,
        }),
        Ok(sys::KtlsRecord::Control {
            record_type: sys::TLS_RECORD_TYPE_ALERT,
            len,
        }) if len >= 2 && buffer[1] == 0 => {
            // close_notify: take it off the queue, then end this direction like a FIN.
            sys::ktls_recv(fd, buffer, libc::MSG_DONTWAIT)
                .map_err(|error| format!("reading close_notify: {error}"))?;
            Ok(Step::Ending)
        }
        // A member's TLS 1.3 session tickets: taken off the queue, nothing to pass on.
        Ok(sys::KtlsRecord::Control {
            record_type: sys::TLS_RECORD_TYPE_HANDSHAKE,
            len,
        }) if crate::tls::only_session_tickets(&buffer[..len]) => {
            sys::ktls_recv(fd, buffer, libc::MSG_DONTWAIT)
                .map_err(|error| format!("reading session tickets: {error}"))?;
            Ok(Step::Fill {
                polled: false,
                blocking: false,
            })
        }
        // A TLS 1.3 KeyUpdate: taken off the queue (the kernel holds what follows until it has
        // the next key), followed, and answered when asked.
        Ok(sys::KtlsRecord::Control {
            record_type: sys::TLS_RECORD_TYPE_HANDSHAKE,
            len,
        }) => {
            sys::ktls_recv(fd, buffer, libc::MSG_DONTWAIT)
                .map_err(|error| format!("reading a handshake record: {error}"))?;
            let keys = source
                .kernel_tls
                .as_mut()
                .ok_or("a handshake record on a plain socket")?;
            match keys.follow_key_update(fd, &buffer[..len]) {
                Ok(()) => {
                    stats.key_updates.fetch_add(1, Ordering::Relaxed);
                    Ok(Step::Fill {
                        polled: false,
                        blocking: false,
                    })
                }
                Err(why) => {
                    tracing::info!(
                        "a TLS handshake message ({len} bytes) after kernel TLS took over: \
                         {why}; pair closed after the bytes before it"
                    );
                    Err(format!("key update: {why}"))
                }
            }
        }
        Ok(sys::KtlsRecord::Control { record_type, len }) => Err(format!(
            "a TLS record of type {record_type} ({len} bytes) after kernel TLS took over"
        )),
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(Step::AwaitReadable),
        Err(error) => Err(format!("reading a control record: {error}")),
    }
}
