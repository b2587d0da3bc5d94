//! Test harness: an in-process wsplice, scripted raw-TCP members and clients, and a byte
//! pattern that lets receivers check every byte without storing what was sent.
#![allow(dead_code)]

pub mod tls;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use wsplice::config::{self, DataplaneMode, QuickForm};
use wsplice::server::ServerHandle;

/// Bytes of a stream named by `seed`: byte `p` is byte `p % 8` of splitmix64(seed + p / 8).
#[derive(Debug, Clone, Copy)]
pub struct Pattern(pub u64);

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Pattern {
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        let mut position = offset;
        let mut index = 0;
        while index < buf.len() {
            let word = splitmix64(self.0.wrapping_add(position / 8)).to_le_bytes();
            let start = (position % 8) as usize;
            let take = (8 - start).min(buf.len() - index);
            buf[index..index + take].copy_from_slice(&word[start..start + take]);
            index += take;
            position += take as u64;
        }
    }

    /// Checks `data` as the bytes at `offset`; the error names the first wrong position.
    pub fn check(&self, offset: u64, data: &[u8], scratch: &mut Vec<u8>) -> Result<(), String> {
        scratch.resize(data.len(), 0);
        self.fill(offset, scratch);
        if scratch[..] == data[..] {
            return Ok(());
        }
        let at = data
            .iter()
            .zip(scratch.iter())
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        Err(format!(
            "byte {} of stream {:#x} is {:#04x}, expected {:#04x}{}",
            offset + at as u64,
            self.0,
            data[at],
            scratch[at],
            self.locate(offset + at as u64, &data[at..])
        ))
    }

    /// Where in the stream the bytes found at `position` really belong (within 64 MiB).
    fn locate(&self, position: u64, found: &[u8]) -> String {
        let probe = &found[..found.len().min(32)];
        if probe.len() < 16 {
            return String::new();
        }
        let mut candidate = vec![0u8; probe.len()];
        let window = 64 << 20;
        for start in position.saturating_sub(window)..position + window {
            self.fill(start, &mut candidate);
            if candidate == probe {
                let delta = start as i64 - position as i64;
                return format!(
                    " (they are stream bytes {start}..: {delta:+} from where they landed)"
                );
            }
        }
        " (not from this stream nearby)".into()
    }
}

/// Reads a stream to EOF, checking it against `pattern`; returns the byte count.
pub fn read_pattern(
    stream: &mut impl Read,
    pattern: Pattern,
    mut offset: u64,
) -> Result<u64, String> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut scratch = Vec::new();
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(offset),
            Ok(n) => {
                pattern.check(offset, &buf[..n], &mut scratch)?;
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read error after {offset} bytes: {e}")),
        }
    }
}

/// Writes `len` bytes of `pattern` starting at `offset`.
pub fn write_pattern(
    stream: &mut impl Write,
    pattern: Pattern,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        pattern.fill(offset + done, &mut buf[..n]);
        stream.write_all(&buf[..n])?;
        done += n as u64;
    }
    Ok(())
}

/// What a member saw on one connection.
#[derive(Debug, Clone)]
pub struct MemberReport {
    pub member: usize,
    /// Bytes received and verified before EOF; `Err` on a wrong byte or a read error.
    pub received: Result<u64, String>,
    pub request_head: String,
}

/// A scripted member: answers every upgrade with 101, then does what the request's
/// `x-test-*` headers ask, and files a report under `x-test-id`.
pub struct Member {
    pub address: SocketAddr,
    pub index: usize,
    pub reports: Arc<Mutex<HashMap<u64, MemberReport>>>,
    /// Connections currently open on this member.
    pub open: Arc<AtomicUsize>,
    /// Connections ever accepted.
    pub accepted: Arc<AtomicU64>,
    /// When set, held connections close (for least-conn tests).
    pub release: Arc<std::sync::atomic::AtomicBool>,
    /// When set, held connections end with a reset.
    pub release_with_reset: Arc<std::sync::atomic::AtomicBool>,
    /// A slow reader's progress: bytes read plus bytes waiting in its receive queue.
    pub taken: Arc<AtomicU64>,
}

pub fn start_members(count: usize) -> Vec<Member> {
    (0..count).map(start_member).collect()
}

pub fn start_member(index: usize) -> Member {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let member = Member {
        address: listener.local_addr().unwrap(),
        index,
        reports: Arc::default(),
        open: Arc::default(),
        accepted: Arc::default(),
        release: Arc::default(),
        release_with_reset: Arc::default(),
        taken: Arc::default(),
    };
    let reset = Arc::clone(&member.release_with_reset);
    let (reports, open, accepted, release, taken) = (
        Arc::clone(&member.reports),
        Arc::clone(&member.open),
        Arc::clone(&member.accepted),
        Arc::clone(&member.release),
        Arc::clone(&member.taken),
    );
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            accepted.fetch_add(1, Ordering::SeqCst);
            open.fetch_add(1, Ordering::SeqCst);
            let (reports, open, release, taken, reset) = (
                Arc::clone(&reports),
                Arc::clone(&open),
                Arc::clone(&release),
                Arc::clone(&taken),
                Arc::clone(&reset),
            );
            thread::spawn(move || {
                serve_member_connection(stream, index, &reports, &release, &taken, &reset);
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    member
}

/// Reads an HTTP head: returns the head and the bytes read past it.
pub fn read_head(stream: &mut impl Read) -> io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "EOF inside the HTTP head: {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

fn header_u64(head: &str, name: &str) -> u64 {
    header(head, name).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn serve_member_connection(
    mut stream: TcpStream,
    index: usize,
    reports: &Mutex<HashMap<u64, MemberReport>>,
    release: &std::sync::atomic::AtomicBool,
    taken: &AtomicU64,
    reset: &std::sync::atomic::AtomicBool,
) {
    let Ok((head, early)) = read_head(&mut stream) else {
        return;
    };
    if let Some(status) = header(&head, "x-test-status") {
        let _ = stream.write_all(
            format!("HTTP/1.1 {status} Nope\r\ncontent-length: 5\r\n\r\nnope\n").as_bytes(),
        );
        return;
    }
    let id = header_u64(&head, "x-test-id");
    let up = Pattern(header_u64(&head, "x-test-up-seed"));
    let down = Pattern(header_u64(&head, "x-test-down-seed"));
    let down_len = header_u64(&head, "x-test-down-len");
    let down_early = header_u64(&head, "x-test-down-early").min(down_len);
    let down_after_eof = header(&head, "x-test-down-when") == Some("after-eof");
    let hold = header(&head, "x-test-hold").is_some();
    let slow =
        header(&head, "x-test-slow").map(|ms| Duration::from_millis(ms.parse().unwrap_or(0)));

    // The 101, with the first down bytes in the same write.
    let mut response = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\n\r\n".to_vec();
    let start = response.len();
    response.resize(start + down_early as usize, 0);
    down.fill(0, &mut response[start..]);
    if stream.write_all(&response).is_err() {
        return;
    }
    if hold {
        // Held connection: stays open until released or closed by the other side.
        stream
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut buf = [0u8; 64];
        loop {
            if release.load(Ordering::SeqCst) {
                return;
            }
            if reset.load(Ordering::SeqCst) {
                socket2::SockRef::from(&stream)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                return;
            }
            match stream.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut => {}
                Err(_) => return,
            }
        }
    }
    let writer = (!down_after_eof).then(|| {
        let mut out = stream.try_clone().unwrap();
        thread::spawn(move || {
            let _ = write_pattern(&mut out, down, down_early, down_len - down_early);
            let _ = out.shutdown(Shutdown::Write);
        })
    });
    let mut received = Pattern::check(&up, 0, &early, &mut Vec::new()).map(|()| early.len() as u64);
    if let Ok(already) = received {
        received = if let Some(slow_for) = slow {
            read_slowly(&mut stream, up, already, taken, slow_for)
        } else {
            read_pattern(&mut stream, up, already)
        };
    }
    reports.lock().unwrap().insert(
        id,
        MemberReport {
            member: index,
            received,
            request_head: head,
        },
    );
    match writer {
        Some(writer) => {
            let _ = writer.join();
        }
        None => {
            let _ = write_pattern(&mut stream, down, down_early, down_len - down_early);
            let _ = stream.shutdown(Shutdown::Write);
        }
    }
    // Wait for the other side's close before closing, so nothing unread triggers a reset.
    let mut sink = [0u8; 1024];
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
}

/// Reads 4 KiB every 10 ms, checking each byte, and publishes how much it has taken from the
/// network: bytes read plus bytes its kernel holds for it.
fn read_slowly(
    stream: &mut TcpStream,
    pattern: Pattern,
    mut offset: u64,
    taken: &AtomicU64,
    slow_for: Duration,
) -> Result<u64, String> {
    let mut buf = vec![0u8; 4096];
    let mut scratch = Vec::new();
    let until = Instant::now() + slow_for;
    while Instant::now() < until {
        let queued =
            wsplice::sys::unread_receive_queue(std::os::fd::AsFd::as_fd(&*stream)).unwrap_or(0);
        taken.store(offset + queued, Ordering::SeqCst);
        match stream.read(&mut buf) {
            Ok(0) => return Ok(offset),
            Ok(n) => {
                pattern.check(offset, &buf[..n], &mut scratch)?;
                offset += n as u64;
            }
            Err(e) => return Err(format!("read error after {offset} bytes: {e}")),
        }
        thread::sleep(Duration::from_millis(10));
    }
    read_pattern(stream, pattern, offset)
}

/// An in-process wsplice in front of `members`.
pub fn start_proxy(
    mode: DataplaneMode,
    members: &[Member],
    lbmethod: &str,
    max_buffered: Option<u64>,
) -> ServerHandle {
    start_proxy_with(mode, members, lbmethod, |settings| {
        if let Some(bytes) = max_buffered {
            settings.max_buffered_per_direction = bytes;
        }
    })
}

/// `start_proxy`, with `edit` applied to the [server] settings.
pub fn start_proxy_with(
    mode: DataplaneMode,
    members: &[Member],
    lbmethod: &str,
    edit: impl FnOnce(&mut config::ServerSettings),
) -> ServerHandle {
    // RUST_LOG=wsplice=debug shows why a pair ended.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut config = config::quick(&QuickForm {
        listen: "127.0.0.1:0".into(),
        members: members
            .iter()
            .map(|m| format!("ws://{}", m.address))
            .collect(),
        lbmethod: Some(lbmethod.into()),
        ..Default::default()
    })
    .unwrap();
    config.server.dataplane = mode;
    config.server.workers = 2;
    // The kernel takes each pair at once, so every test exercises it; the userspace trial
    // before it has tests of its own.
    config.server.offload_after = None;
    edit(&mut config.server);
    let server = wsplice::server::start(config).unwrap();
    let carrier = server.shared.dataplane.carrier();
    let expected = match mode {
        DataplaneMode::Sockmap => wsplice::dataplane::Carrier::Sockmap,
        DataplaneMode::Splice => wsplice::dataplane::Carrier::Splice,
        _ => wsplice::dataplane::Carrier::Userspace,
    };
    assert_eq!(
        carrier, expected,
        "{}",
        server.shared.dataplane.announcement
    );
    server
}

/// How and when a client sends and closes.
#[derive(Debug, Clone, Copy)]
pub struct ClientPlan {
    pub id: u64,
    pub up_seed: u64,
    pub up_len: u64,
    /// Up bytes written in the same write as the request.
    pub up_with_request: u64,
    /// Send every up byte before reading the 101 (else after it).
    pub up_before_101: bool,
    pub down_seed: u64,
    pub down_len: u64,
    pub down_early: u64,
    pub down_after_eof: bool,
    /// Half-close (shutdown write, then read to EOF) or close at once after sending.
    pub half_close: bool,
    pub pause_before_close: Duration,
    /// The member reads 4 KiB every 10 ms for this long, then at full speed.
    pub slow_member: Option<Duration>,
}

impl ClientPlan {
    pub fn simple(id: u64, up_len: u64, down_len: u64) -> Self {
        ClientPlan {
            id,
            up_seed: id.wrapping_mul(7_919) ^ 0xa5a5,
            up_len,
            up_with_request: 0,
            up_before_101: false,
            down_seed: id.wrapping_mul(104_729) ^ 0x5a5a,
            down_len,
            down_early: 0,
            down_after_eof: false,
            half_close: true,
            pause_before_close: Duration::ZERO,
            slow_member: None,
        }
    }
}

pub fn upgrade_request(plan: &ClientPlan) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: test.local\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: chat\r\nx-test-id: {}\r\nx-test-up-seed: {}\r\n\
         x-test-down-seed: {}\r\nx-test-down-len: {}\r\nx-test-down-early: {}\r\n\
         x-test-down-when: {}\r\n{}\r\n",
        plan.id,
        plan.up_seed,
        plan.down_seed,
        plan.down_len,
        plan.down_early,
        if plan.down_after_eof {
            "after-eof"
        } else {
            "concurrent"
        },
        plan.slow_member.map_or(String::new(), |d| format!(
            "x-test-slow: {}\r\n",
            d.as_millis()
        )),
    )
}

/// What the client saw: the 101's head and the down bytes verified before EOF.
#[derive(Debug)]
pub struct ClientReport {
    pub head: String,
    pub received: Result<u64, String>,
}

/// The write half of a client connection: its FIN is a half-close (TLS: close_notify + FIN).
pub trait WriteHalf: Write + Send {
    fn shutdown_write(&mut self) -> io::Result<()>;
}

impl WriteHalf for TcpStream {
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// A client connection as two halves used from two threads; dropping both closes it.
pub struct Connection {
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn WriteHalf>,
}

/// Opens a client connection to the proxy (plain TCP, or TLS in the TLS tests).
pub type Dial = Arc<dyn Fn(SocketAddr) -> io::Result<Connection> + Send + Sync>;

pub fn plain_dial() -> Dial {
    Arc::new(|proxy| {
        let stream = TcpStream::connect(proxy)?;
        Ok(Connection {
            reader: Box::new(stream.try_clone()?),
            writer: Box::new(stream),
        })
    })
}

/// Runs one client connection through the proxy per `plan`.
pub fn run_client(proxy: SocketAddr, plan: &ClientPlan) -> Result<ClientReport, String> {
    run_client_over(&plain_dial(), proxy, plan)
}

/// Runs one client connection per `plan` over what `dial` opens.
pub fn run_client_over(
    dial: &Dial,
    proxy: SocketAddr,
    plan: &ClientPlan,
) -> Result<ClientReport, String> {
    let Connection {
        mut reader,
        writer: mut stream,
    } = dial(proxy).map_err(|e| format!("connect: {e}"))?;
    let mut first = upgrade_request(plan).into_bytes();
    let with_request = plan.up_with_request.min(plan.up_len);
    let start = first.len();
    first.resize(start + with_request as usize, 0);
    Pattern(plan.up_seed).fill(0, &mut first[start..]);
    stream
        .write_all(&first)
        .map_err(|e| format!("write request: {e}"))?;
    let up = Pattern(plan.up_seed);
    let send_rest = |stream: &mut Box<dyn WriteHalf>| -> Result<(), String> {
        write_pattern(stream, up, with_request, plan.up_len - with_request)
            .map_err(|e| format!("write up: {e}"))?;
        thread::sleep(plan.pause_before_close);
        if plan.half_close {
            stream
                .shutdown_write()
                .map_err(|e| format!("shutdown: {e}"))?;
        }
        Ok(())
    };
    if plan.up_before_101 {
        send_rest(&mut stream)?;
    }
    let (head, early) = read_head(&mut reader).map_err(|e| format!("read 101: {e}"))?;
    if !head.starts_with("HTTP/1.1 101") {
        return Ok(ClientReport {
            head,
            received: Err("not switched".into()),
        });
    }
    if !plan.half_close && plan.down_len == 0 {
        // Full close: nothing more is expected, so close right after sending.
        if !plan.up_before_101 {
            send_rest(&mut stream)?;
        }
        drop((stream, reader));
        return Ok(ClientReport {
            head,
            received: Ok(0),
        });
    }
    let down = Pattern(plan.down_seed);
    let reader = thread::spawn(move || {
        down.check(0, &early, &mut Vec::new())?;
        read_pattern(&mut reader, down, early.len() as u64)
    });
    if !plan.up_before_101 {
        send_rest(&mut stream)?;
    }
    Ok(ClientReport {
        head,
        received: reader.join().unwrap(),
    })
}

/// A held WebSocket through the proxy: a reader thread closes it when the member ends it (as a
/// browser would); dropping it closes it from the client side.
pub struct Held {
    stream: TcpStream,
    reader: Option<thread::JoinHandle<()>>,
}

impl Held {
    pub fn open(proxy: SocketAddr, id: u64) -> Held {
        let mut stream = TcpStream::connect(proxy).unwrap();
        let request = upgrade_request(&ClientPlan::simple(id, 0, 0))
            .replace("x-test-id", "x-test-hold: 1\r\nx-test-id");
        stream.write_all(request.as_bytes()).unwrap();
        let (head, _) = read_head(&mut stream).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let mut input = stream.try_clone().unwrap();
        let reader = thread::spawn(move || {
            let mut buf = [0u8; 64];
            while matches!(input.read(&mut buf), Ok(n) if n > 0) {}
            let _ = input.shutdown(Shutdown::Both);
        });
        Held {
            stream,
            reader: Some(reader),
        }
    }

    /// Closes with a reset (SO_LINGER 0).
    pub fn reset(mut self) {
        socket2::SockRef::from(&self.stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        let _ = self.stream.shutdown(Shutdown::Read);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }

    /// Whether the member's close reached this client.
    pub fn ended(&self) -> bool {
        self.reader
            .as_ref()
            .is_none_or(|reader| reader.is_finished())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The report a member filed for connection `id`, waiting up to `limit` for it.
pub fn wait_for_report(members: &[Member], id: u64, limit: Duration) -> Option<MemberReport> {
    let find = || {
        members
            .iter()
            .find_map(|m| m.reports.lock().unwrap().get(&id).cloned())
    };
    wait_until(limit, || find().is_some());
    find()
}

/// A userspace-mode quick-form config in front of `members` (ws:// URLs).
pub fn userspace_config(members: Vec<String>) -> wsplice::config::Config {
    let mut config = config::quick(&QuickForm {
        listen: "127.0.0.1:0".into(),
        members,
        lbmethod: None,
        ..Default::default()
    })
    .unwrap();
    config.server.dataplane = DataplaneMode::Userspace;
    config
}

/// Waits until `condition` holds or `limit` passes; returns whether it held.
pub fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        thread::sleep(Duration::from_millis(5));
    }
    condition()
}

/// Sends a raw request and returns the status line and the whole answer.
pub fn raw_exchange(proxy: SocketAddr, request: &[u8]) -> (String, String) {
    let mut stream = TcpStream::connect(proxy).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&answer[..end]).into_owned();
                    let length =
                        header(&head, "content-length").and_then(|v| v.parse::<usize>().ok());
                    if length.is_some_and(|len| answer.len() >= end + 4 + len) {
                        break;
                    }
                }
            }
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    (text.lines().next().unwrap_or_default().to_string(), text)
}

/// After every pair has closed: every member's live count is back to zero, no pair is open in
/// the carrier and, in sockmap mode, every map is empty.
pub fn assert_no_state_left(proxy: &ServerHandle) {
    let counted_out = wait_until(Duration::from_secs(10), || {
        proxy.shared.router.clusters.iter().all(|cluster| {
            let balancer = cluster.balancer.lock().unwrap();
            (0..cluster.members.len()).all(|member| balancer.live(member) == 0)
        })
    });
    assert!(
        counted_out,
        "a member still counts live tunnels after every pair closed"
    );
    if let Some(splice) = proxy.shared.dataplane.splice() {
        let closed = wait_until(Duration::from_secs(10), || {
            splice.stats.open_pairs.load(Ordering::SeqCst) == 0
        });
        assert!(
            closed,
            "{} spliced pairs still open",
            splice.stats.open_pairs.load(Ordering::SeqCst)
        );
    }
    let Some(sockmap) = proxy.shared.dataplane.sockmap() else {
        return;
    };
    let clean = wait_until(Duration::from_secs(10), || {
        sockmap.stats.pairs_open.load(Ordering::SeqCst) == 0
            && sockmap.map_entries().unwrap() == (0, 0, 0)
    });
    assert!(
        clean,
        "state left: {} pairs open, map entries (SOCKS, LINKS, FLOWS) = {:?}",
        sockmap.stats.pairs_open.load(Ordering::SeqCst),
        sockmap.map_entries().unwrap()
    );
}

/// Runs plans on `parallel` threads over `dial` and checks both directions of every
/// connection, then that no state is left.
pub fn run_and_check_over(
    dial: &Dial,
    proxy: &ServerHandle,
    members: &[Member],
    plans: Vec<ClientPlan>,
    parallel: usize,
) {
    let address = proxy.addresses[0];
    let queue = Arc::new(Mutex::new(plans.clone()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..parallel)
        .map(|_| {
            let (queue, failures, dial) =
                (Arc::clone(&queue), Arc::clone(&failures), Arc::clone(dial));
            thread::spawn(move || {
                loop {
                    let Some(plan) = queue.lock().unwrap().pop() else {
                        return;
                    };
                    let expected_down = if plan.half_close || plan.down_len > 0 {
                        plan.down_len
                    } else {
                        0
                    };
                    match run_client_over(&dial, address, &plan) {
                        Ok(report) if report.received == Ok(expected_down) => {}
                        Ok(report) => failures.lock().unwrap().push(format!(
                            "client {}: expected {expected_down} down bytes, got {:?} (head {:?})",
                            plan.id,
                            report.received,
                            report.head.lines().next()
                        )),
                        Err(error) => failures
                            .lock()
                            .unwrap()
                            .push(format!("client {}: {error}", plan.id)),
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} clients failed, first: {:?}",
        failures.len(),
        plans.len(),
        &failures[..failures.len().min(5)]
    );
    for plan in &plans {
        let report = wait_for_report(members, plan.id, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("member never reported connection {}", plan.id));
        assert_eq!(
            report.received,
            Ok(plan.up_len),
            "connection {}: {plan:?}",
            plan.id
        );
    }
    assert_no_state_left(proxy);
}

/// Small deterministic generator for test plans (seeded, so failures replay).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 { 0 } else { self.next() % bound }
    }
}

/// The 10,000 close and half-close races: sizes, close kinds and timings from `seed`.
pub fn race_plans(seed: u64, count: u64) -> Vec<ClientPlan> {
    let mut rng = Rng(seed);
    (0..count)
        .map(|id| {
            let half_close = rng.below(2) == 0;
            let up_len = rng.below(256 * 1024 + 1);
            // A fully closing client reads nothing after the 101 (unread bytes would reset).
            let down_len = if half_close { rng.below(64 * 1024) } else { 0 };
            let mut plan = ClientPlan::simple(id, up_len, down_len);
            plan.half_close = half_close;
            // When the close lands: with the request, before the 101, or after it.
            match rng.below(3) {
                0 => {
                    plan.up_with_request = up_len;
                    plan.up_before_101 = true;
                }
                1 => {
                    plan.up_with_request = rng.below(up_len + 1);
                    plan.up_before_101 = half_close;
                }
                _ => plan.pause_before_close = Duration::from_micros(rng.below(2000)),
            }
            plan.down_early = rng.below(down_len + 1).min(4096);
            plan.down_after_eof = rng.below(2) == 0;
            plan
        })
        .collect()
}

/// The most bytes wsplice and its kernel held during `during`, sampled every 20 ms while a
/// client pushes through `client` to `member`: bytes the client's socket got acked (since
/// `base_acked`) less bytes the member has taken (read, or in its own receive queue).
pub fn peak_held(client: &TcpStream, base_acked: u64, member: &Member, during: Duration) -> u64 {
    let mut peak = 0u64;
    let deadline = Instant::now() + during;
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
        let acked = wsplice::sys::tcp_info(std::os::fd::AsFd::as_fd(client))
            .unwrap()
            .bytes_acked
            - base_acked;
        let taken = member.taken.load(Ordering::SeqCst);
        peak = peak.max(acked.saturating_sub(taken));
    }
    peak
}
