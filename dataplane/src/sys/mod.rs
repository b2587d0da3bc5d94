//! The one module that talks to the kernel directly: bpf(2) map operations, socket options and
//! ioctls the std/socket2 APIs lack, and epoll for offloaded sockets. Every `unsafe` block
//! carries a `// SAFETY:` comment; the rest of the crate forbids `unsafe`.
#![allow(unsafe_code)]

pub mod uring;

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Plain-old-data that can cross the bpf(2) boundary as bytes: `#[repr(C)]`, no padding
/// with meaning, every bit pattern valid.
///
/// # Safety
/// Implementors must be `#[repr(C)]` structs or integers for which any bit pattern is valid.
pub unsafe trait Pod: Copy + 'static {}
// SAFETY: integers accept every bit pattern.
unsafe impl Pod for u32 {}
// SAFETY: integers accept every bit pattern.
unsafe impl Pod for u64 {}

/// Mirror of `struct wsplice_link` in ebpf/wsplice.h (LINKS map value).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BpfLink {
    pub peer_cookie: u64,
    pub limit: u64,
    pub peer_base: u64,
    pub relayed: u64,
}
// SAFETY: repr(C), four u64 fields, no padding; every bit pattern is valid.
unsafe impl Pod for BpfLink {}

/// Mirror of `struct wsplice_flow` in ebpf/wsplice.h (FLOWS map value).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BpfFlow {
    pub redirected: u64,
    pub passed: u64,
    pub last_ns: u64,
    pub trimmed: u64,
    pub next_seq: u32,
    pub seq_known: u32,
    pub broken: u64,
}
// SAFETY: repr(C); u64, u64, u64, u64, u32, u32, u64 leaves no padding; every bit pattern
// is valid.
unsafe impl Pod for BpfFlow {}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// `BPF_ANY`: create or replace.
pub const BPF_ANY: u64 = 0;
/// `BPF_NOEXIST`: create only.
pub const BPF_NOEXIST: u64 = 1;

fn bpf(command: libc::c_long, attr: &mut MapElemAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix for the map element commands and
    // lives for the call; the pointers inside it point at caller-owned buffers of the map's key
    // and value sizes (checked by the callers' types against the map definitions).
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut MapElemAttr,
            size_of::<MapElemAttr>() as libc::c_uint,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Creates or replaces `map[key] = value`. For a sockhash, `value` is the socket's fd (u32).
pub fn map_update<K: Pod, V: Pod>(
    map: BorrowedFd,
    key: &K,
    value: &V,
    flags: u64,
) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key as *const K as u64,
        value_or_next_key: value as *const V as u64,
        flags,
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
}

/// Reads `map[key]`, `None` when absent.
pub fn map_lookup<K: Pod, V: Pod>(map: BorrowedFd, key: &K) -> io::Result<Option<V>> {
    // SAFETY: V is Pod, so the all-zero pattern is a valid value.
    let mut value: V = unsafe { zeroed() };
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key as *const K as u64,
        value_or_next_key: &mut value as *mut V as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(()) => Ok(Some(value)),
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(error) => Err(error),
    }
}

/// Deletes `map[key]`; `false` when it was absent.
pub fn map_delete<K: Pod>(map: BorrowedFd, key: &K) -> io::Result<bool> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key as *const K as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Ok(()) => Ok(true),
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(error) => Err(error),
    }
}

/// Counts the keys of a map whose keys are `K`.
pub fn map_len<K: Pod>(map: BorrowedFd) -> io::Result<usize> {
    let mut count = 0;
    // SAFETY: K is Pod, so the all-zero pattern is a valid value.
    let mut key: K = unsafe { zeroed() };
    let mut first = true;
    loop {
        // SAFETY: as above.
        let mut next: K = unsafe { zeroed() };
        let mut attr = MapElemAttr {
            map_fd: map.as_raw_fd() as u32,
            key: if first { 0 } else { &key as *const K as u64 },
            value_or_next_key: &mut next as *mut K as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(()) => {
                count += 1;
                key = next;
                first = false;
            }
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => return Ok(count),
            Err(error) => return Err(error),
        }
    }
}

fn getsockopt_bytes(fd: BorrowedFd, level: i32, name: i32, buf: &mut [u8]) -> io::Result<usize> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is writable for `len` bytes and `len` is a valid in/out length.
    let result = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(len as usize)
    }
}

fn setsockopt_int(fd: BorrowedFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    setsockopt_bytes(fd, level, name, &value.to_ne_bytes())
}

/// The kernel's socket cookie: a stable 64-bit id, the key of the BPF maps.
pub fn socket_cookie(fd: BorrowedFd) -> io::Result<u64> {
    let mut buf = [0u8; 8];
    getsockopt_bytes(fd, libc::SOL_SOCKET, libc::SO_COOKIE, &mut buf)?;
    Ok(u64::from_ne_bytes(buf))
}

/// Kernel TLS parameters for one direction of a socket (`struct tls12_crypto_info_*` in
/// linux/tls.h: version, cipher, iv, key, salt, record sequence, no padding).
#[derive(Clone, PartialEq, Eq)]
pub struct KtlsDirection {
    pub version: u16,
    pub cipher: u16,
    pub iv: Vec<u8>,
    pub key: Vec<u8>,
    pub salt: Vec<u8>,
    pub record_sequence: u64,
}

impl std::fmt::Debug for KtlsDirection {
    /// Keys stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KtlsDirection")
            .field("version", &self.version)
            .field("cipher", &self.cipher)
            .finish_non_exhaustive()
    }
}

pub const TLS_1_2_VERSION: u16 = 0x0303;
pub const TLS_1_3_VERSION: u16 = 0x0304;
pub const TLS_CIPHER_AES_GCM_128: u16 = 51;
pub const TLS_CIPHER_AES_GCM_256: u16 = 52;
pub const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;
const TCP_ULP: i32 = 31;
const SOL_TLS: i32 = 282;
const TLS_TX: i32 = 1;
const TLS_RX: i32 = 2;

fn setsockopt_bytes(fd: BorrowedFd, level: i32, name: i32, value: &[u8]) -> io::Result<()> {
    // SAFETY: `value` is readable for its length, which is passed.
    let result = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Attaches the kernel TLS ULP to an established TCP socket (ENOENT: no kernel TLS).
pub fn ktls_attach(fd: BorrowedFd) -> io::Result<()> {
    setsockopt_bytes(fd, libc::IPPROTO_TCP, TCP_ULP, b"tls")
}

/// Hands one direction's keys to kernel TLS: from then on the kernel encrypts what is
/// written (`transmit`) or decrypts what is read.
pub fn ktls_set(fd: BorrowedFd, transmit: bool, direction: &KtlsDirection) -> io::Result<()> {
    let mut info = Vec::with_capacity(4 + direction.iv.len() + direction.key.len() + 12);
    info.extend_from_slice(&direction.version.to_ne_bytes());
    info.extend_from_slice(&direction.cipher.to_ne_bytes());
    info.extend_from_slice(&direction.iv);
    info.extend_from_slice(&direction.key);
    info.extend_from_slice(&direction.salt);
    info.extend_from_slice(&direction.record_sequence.to_be_bytes());
    let name = if transmit { TLS_TX } else { TLS_RX };
    setsockopt_bytes(fd, SOL_TLS, name, &info)
}

/// What one receive from a kernel TLS socket got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KtlsRecord {
    /// Application data (0 bytes: the peer's FIN).
    Data(usize),
    /// A record of another type (21 alert, 22 handshake), its plaintext in the buffer.
    Control { record_type: u8, len: usize },
}

const TLS_GET_RECORD_TYPE: i32 = 2;

/// A message header for one buffer and an (aligned) control buffer.
fn message_header(iov: &mut libc::iovec, control: &mut [u64]) -> libc::msghdr {
    // SAFETY: msghdr is plain data; all-zero is a valid empty header, filled in below.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = size_of_val(control) as _;
    message
}
/// TLS record content types (RFC 8446 B.1).
pub const TLS_RECORD_TYPE_ALERT: u8 = 21;
pub const TLS_RECORD_TYPE_HANDSHAKE: u8 = 22;
const TLS_RECORD_TYPE_APPLICATION_DATA: u8 = 23;

/// Receives from a kernel TLS socket with room for the record type: a plain read fails with
/// EIO when the next record is not application data (an alert such as close_notify, or a
/// TLS 1.3 handshake message such as KeyUpdate).
pub fn ktls_recv(fd: BorrowedFd, buf: &mut [u8], flags: i32) -> io::Result<KtlsRecord> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // u64s keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 8];
    let mut message = message_header(&mut iov, &mut control);
    // SAFETY: the iovec points at `buf` and the control buffer at `control`, both live and
    // writable for the lengths given.
    let received = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut message, flags) };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = received as usize;
    let mut record_type = TLS_RECORD_TYPE_APPLICATION_DATA;
    // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR walk the control data the kernel wrote into `message`
    // (bounded by msg_controllen); CMSG_DATA of a SOL_TLS record-type message holds one byte.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&message);
        while !header.is_null() {
            if (*header).cmsg_level == SOL_TLS && (*header).cmsg_type == TLS_GET_RECORD_TYPE {
                record_type = *libc::CMSG_DATA(header);
            }
            header = libc::CMSG_NXTHDR(&message, header);
        }
    }
    if record_type == TLS_RECORD_TYPE_APPLICATION_DATA {
        Ok(KtlsRecord::Data(len))
    } else {
        Ok(KtlsRecord::Control { record_type, len })
    }
}

const TLS_SET_RECORD_TYPE: i32 = 1;

/// Sends a close_notify alert through kernel TLS (before shutting the write side down).
pub fn ktls_send_close_notify(fd: BorrowedFd) -> io::Result<()> {
    ktls_send_control(fd, TLS_RECORD_TYPE_ALERT, &[1, 0]) // warning, close_notify
}

/// Sends one record of `record_type` (alert or handshake) through kernel TLS, without
/// blocking; the kernel encrypts it with the current transmit key.
pub fn ktls_send_control(fd: BorrowedFd, record_type: u8, payload: &[u8]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    let mut control = [0u64; 4];
    let mut message = message_header(&mut iov, &mut control);
    // SAFETY: CMSG_SPACE/CMSG_LEN only compute sizes; the first header lies inside `control`
    // (32 bytes, more than CMSG_SPACE(1)) and its one data byte too.
    unsafe {
        message.msg_controllen = libc::CMSG_SPACE(1) as _;
        let header = libc::CMSG_FIRSTHDR(&message);
        (*header).cmsg_level = SOL_TLS;
        (*header).cmsg_type = TLS_SET_RECORD_TYPE;
        (*header).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(header) = record_type;
    }
    // SAFETY: the iovec (read only by sendmsg) and the control buffer are live for the call.
    let sent = unsafe { libc::sendmsg(fd.as_raw_fd(), &message, libc::MSG_DONTWAIT) };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else if sent as usize != payload.len() {
        Err(io::Error::other(format!(
            "a {}-byte TLS control record went out as {sent} bytes",
            payload.len()
        )))
    } else {
        Ok(())
    }
}

/// The socket's upper layer protocol ("tls" once kernel TLS is attached, "" for none).
pub fn tcp_ulp(fd: BorrowedFd) -> io::Result<String> {
    let mut name = [0u8; 16];
    let len = getsockopt_bytes(fd, libc::IPPROTO_TCP, TCP_ULP, &mut name)?;
    let name = &name[..len];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// splice(2) of up to `len` bytes from `from` to `to` (one a pipe), without waiting.
pub fn splice_nonblocking(from: BorrowedFd, to: BorrowedFd, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are borrowed live for the call; null offsets mean "the file's own
    // position", as splice(2) requires for pipes and sockets. No memory is passed.
    let moved = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if moved < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(moved as usize)
    }
}

/// Sets SO_RCVLOWAT; setting it also runs the socket's data-ready callback, which makes a
/// sockmap verdict look at bytes queued before the socket joined the map.
pub fn set_rcvlowat(fd: BorrowedFd, bytes: i32) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

/// Gives the allocator's free memory back to the kernel: glibc keeps what a burst of
/// connections freed in its arenas, where it still counts as resident.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointer; it only walks the allocator's own free lists,
    // under the allocator's locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The parts of `struct tcp_info` wsplice reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpInfo {
    pub state: u8,
    pub bytes_acked: u64,
    pub bytes_received: u64,
}

/// `TCP_ESTABLISHED` in `tcpi_state`.
pub const TCP_ESTABLISHED: u8 = 1;

pub fn tcp_info(fd: BorrowedFd) -> io::Result<TcpInfo> {
    // Offsets in the uapi struct tcp_info, stable since Linux 4.x.
    const BYTES_ACKED: usize = 120;
    const BYTES_RECEIVED: usize = 128;
    let mut buf = [0u8; 232];
    let len = getsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut buf)?;
    if len < BYTES_RECEIVED + 8 {
        return Err(io::Error::other(
            "tcp_info too short: kernel older than 4.1",
        ));
    }
    let u64_at = |at: usize| u64::from_ne_bytes(buf[at..at + 8].try_into().unwrap_or([0; 8]));
    Ok(TcpInfo {
        state: buf[0],
        bytes_acked: u64_at(BYTES_ACKED),
        bytes_received: u64_at(BYTES_RECEIVED),
    })
}

fn ioctl_int(fd: BorrowedFd, request: libc::Ioctl) -> io::Result<u64> {
    let mut value: libc::c_int = 0;
    // SAFETY: SIOCOUTQ/SIOCINQ write one int through the pointer, which is live.
    let result = unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut value as *mut libc::c_int) };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value.max(0) as u64)
    }
}

/// Bytes in the send queue not yet acked by the receiver (SIOCOUTQ).
pub fn unacked_send_queue(fd: BorrowedFd) -> io::Result<u64> {
    ioctl_int(fd, libc::TIOCOUTQ)
}

/// Bytes in the receive queue not yet read (SIOCINQ).
pub fn unread_receive_queue(fd: BorrowedFd) -> io::Result<u64> {
    ioctl_int(fd, libc::FIONREAD)
}

/// Every byte ever written into a TCP socket by anyone: acked plus still queued. Read until two
/// consecutive reads of `bytes_acked` agree, so an ACK between the two calls cannot skew it.
pub fn bytes_written(fd: BorrowedFd) -> io::Result<u64> {
    loop {
        let acked = tcp_info(fd)?.bytes_acked;
        let queued = unacked_send_queue(fd)?;
        if tcp_info(fd)?.bytes_acked == acked {
            return Ok(acked + queued);
        }
    }
}

/// An epoll instance.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
}

pub const EPOLLIN: u32 = libc::EPOLLIN as u32;
pub const EPOLLOUT: u32 = libc::EPOLLOUT as u32;
pub const EPOLLRDHUP: u32 = libc::EPOLLRDHUP as u32;
pub const EPOLLERR: u32 = libc::EPOLLERR as u32;
pub const EPOLLHUP: u32 = libc::EPOLLHUP as u32;
pub const EPOLLET: u32 = libc::EPOLLET as u32;

/// One readiness report: the registration's token and the event bits.
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    pub token: u64,
    pub events: u32,
}

impl Epoll {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall with a flag argument.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by epoll_create1 and is owned by nobody else.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn control(&self, op: i32, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: `event` is live for the call; the epoll fd is owned by self.
        let result = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut event) };
        if result < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    pub fn add(&self, fd: BorrowedFd, events: u32, token: u64) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_ADD, fd.as_raw_fd(), events, token)
    }

    pub fn modify(&self, fd: BorrowedFd, events: u32, token: u64) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_MOD, fd.as_raw_fd(), events, token)
    }

    pub fn delete(&self, fd: BorrowedFd) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_DEL, fd.as_raw_fd(), 0, 0)
    }

    /// Waits up to `timeout` (forever when `None`) and appends what is ready to `ready`.
    pub fn wait(&self, ready: &mut Vec<Ready>, timeout: Option<Duration>) -> io::Result<()> {
        const BATCH: usize = 256;
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
        let timeout_ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: `events` is writable for BATCH entries.
        let count = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.as_mut_ptr(),
                BATCH as i32,
                timeout_ms,
            )
        };
        if count < 0 {
            let error = io::Error::last_os_error();
            return if error.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(error)
            };
        }
        ready.extend(events[..count as usize].iter().map(|event| Ready {
            token: event.u64,
            events: event.events,
        }));
        Ok(())
    }
}

impl AsFd for Epoll {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The soft limit on open descriptors (RLIMIT_NOFILE), which bounds how many pairs fit.
pub fn open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a live rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    }
}

fn clock(id: libc::clockid_t) -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a live timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(id, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the verdict's bpf_ktime_get_ns().
pub fn monotonic_ns() -> u64 {
    clock(libc::CLOCK_MONOTONIC).as_nanos() as u64
}

/// CPU time this thread has used, for measurements.
pub fn thread_cpu_time() -> Duration {
    clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time the whole process has used, all threads (io_uring's workers included).
pub fn process_cpu_time() -> Duration {
    clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// Whether this process may load BPF programs (CAP_BPF or CAP_SYS_ADMIN, in practice root).
pub fn effective_uid_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn tcp_counters_follow_the_bytes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        // bytes_acked may count the SYN: only differences are meaningful, as in the carrier.
        let before = bytes_written(client.as_fd()).unwrap();
        client.write_all(&[7u8; 5000]).unwrap();
        let mut buf = vec![0u8; 5000];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(bytes_written(client.as_fd()).unwrap() - before, 5000);
        let info = tcp_info(server.as_fd()).unwrap();
        assert_eq!(info.state, TCP_ESTABLISHED);
        assert_eq!(info.bytes_received, 5000);
        assert_eq!(unread_receive_queue(server.as_fd()).unwrap(), 0);
        assert_ne!(
            socket_cookie(client.as_fd()).unwrap(),
            socket_cookie(server.as_fd()).unwrap()
        );
    }

    #[test]
    fn epoll_reports_a_peer_half_close_as_rdhup() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let epoll = Epoll::new().unwrap();
        epoll.add(server.as_fd(), EPOLLRDHUP, 42).unwrap();
        let mut ready = Vec::new();
        epoll.wait(&mut ready, Some(Duration::ZERO)).unwrap();
        assert!(ready.is_empty());
        client.shutdown(std::net::Shutdown::Write).unwrap();
        epoll
            .wait(&mut ready, Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].token, 42);
        assert_ne!(ready[0].events & EPOLLRDHUP, 0);
    }
}
