//! A pair relay driven by io_uring, on the calling thread: each direction has one operation in
//! flight, either read + write through a userspace buffer or splice through a pipe (the kernel
//! moves pages; payload never enters userspace). A direction's FIN is passed on after its last
//! byte. Used to measure whether io_uring pays for the userspace relay (`relay_bench`).

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use io_uring::{IoUring, opcode, types};

const CHUNK: u32 = 64 * 1024;

/// How bytes cross from one socket to the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copy {
    /// read(2) into a userspace buffer, write(2) out of it.
    ReadWrite,
    /// splice(2) socket -> pipe -> socket.
    Splice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Fill,
    Drain,
    Shutdown,
    Done,
}

struct Direction {
    source: RawFd,
    dest: RawFd,
    /// ReadWrite: the buffer; bytes `[sent, filled)` wait for the destination.
    buffer: Box<[u8]>,
    filled: usize,
    sent: usize,
    /// Splice: the pipe; `in_pipe` bytes wait in it.
    pipe: Option<(OwnedFd, OwnedFd)>,
    in_pipe: usize,
    step: Step,
    moved: u64,
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (reader, writer) = std::io::pipe()?;
    Ok((OwnedFd::from(reader), OwnedFd::from(writer)))
}

impl Direction {
    fn new(source: &TcpStream, dest: &TcpStream, copy: Copy) -> io::Result<Self> {
        Ok(Direction {
            source: source.as_raw_fd(),
            dest: dest.as_raw_fd(),
            buffer: vec![0u8; CHUNK as usize].into_boxed_slice(),
            filled: 0,
            sent: 0,
            pipe: if copy == Copy::Splice {
                Some(pipe()?)
            } else {
                None
            },
            in_pipe: 0,
            step: Step::Fill,
            moved: 0,
        })
    }

    /// The submission for this direction's current step.
    fn entry(&mut self, tag: u64) -> Option<io_uring::squeue::Entry> {
        let entry = match (self.step, &self.pipe) {
            (Step::Fill, None) => {
                opcode::Read::new(types::Fd(self.source), self.buffer.as_mut_ptr(), CHUNK).build()
            }
            (Step::Drain, None) => opcode::Write::new(
                types::Fd(self.dest),
                // The unsent tail of the buffer; it stays put until this completes.
                self.buffer[self.sent..].as_ptr(),
                (self.filled - self.sent) as u32,
            )
            .build(),
            (Step::Fill, Some((_, writer))) => opcode::Splice::new(
                types::Fd(self.source),
                -1,
                types::Fd(writer.as_raw_fd()),
                -1,
                CHUNK,
            )
            .build(),
            (Step::Drain, Some((reader, _))) => opcode::Splice::new(
                types::Fd(reader.as_raw_fd()),
                -1,
                types::Fd(self.dest),
                -1,
                self.in_pipe as u32,
            )
            .build(),
            (Step::Shutdown, _) => {
                opcode::Shutdown::new(types::Fd(self.dest), libc::SHUT_WR).build()
            }
            (Step::Done, _) => return None,
        };
        Some(entry.user_data(tag))
    }

    /// Applies a completion; an error ends the relay.
    fn complete(&mut self, result: i32) -> io::Result<()> {
        if result == -libc::EAGAIN || result == -libc::EINTR {
            return Ok(()); // same step again
        }
        if result < 0 && self.step != Step::Shutdown {
            return Err(io::Error::from_raw_os_error(-result));
        }
        let count = result.max(0) as usize;
        self.step = match self.step {
            Step::Fill if count == 0 => Step::Shutdown,
            Step::Fill => {
                (self.filled, self.sent, self.in_pipe) = (count, 0, count);
                Step::Drain
            }
            Step::Drain => {
                self.moved += count as u64;
                self.sent += count;
                self.in_pipe = self.in_pipe.saturating_sub(count);
                let left = if self.pipe.is_some() {
                    self.in_pipe
                } else {
                    self.filled - self.sent
                };
                if left > 0 { Step::Drain } else { Step::Fill }
            }
            Step::Shutdown | Step::Done => Step::Done,
        };
        Ok(())
    }
}

/// Relays `a` <-> `b` until both directions have ended; returns the bytes moved a->b, b->a.
pub fn relay(a: &TcpStream, b: &TcpStream, copy: Copy) -> io::Result<(u64, u64)> {
    let mut ring = IoUring::new(8)?;
    let mut directions = [Direction::new(a, b, copy)?, Direction::new(b, a, copy)?];
    let mut in_flight = [false; 2];
    loop {
        for (tag, direction) in directions.iter_mut().enumerate() {
            if in_flight[tag] {
                continue;
            }
            if let Some(entry) = direction.entry(tag as u64) {
                // SAFETY: the entry points at this direction's buffer, pipe and socket fds,
                // which live in `directions` (boxed buffer, owned fds; `a`, `b` borrowed for
                // the whole call) until the completion for `tag` is reaped below; at most one
                // entry per direction is in flight, so nothing else touches that buffer.
                unsafe { ring.submission().push(&entry) }
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                in_flight[tag] = true;
            }
        }
        if !in_flight.contains(&true) {
            return Ok((directions[0].moved, directions[1].moved));
        }
        ring.submit_and_wait(1)?;
        let completed: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (tag, result) in completed {
            let tag = tag as usize;
            in_flight[tag] = false;
            directions[tag].complete(result)?;
        }
    }
}

/// An io_uring that carries only fd operations (poll and splice): no submission points into
/// userspace memory, so pushing one is safe whatever the caller does afterwards. The caller
/// keeps each fd open until its operation's completion is reaped, so a number the kernel has
/// not looked up yet is never reused for another file.
pub struct FdRing {
    ring: IoUring,
}

impl std::fmt::Debug for FdRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdRing").finish_non_exhaustive()
    }
}

impl FdRing {
    pub fn new(entries: u32) -> io::Result<FdRing> {
        Ok(FdRing {
            ring: IoUring::new(entries)?,
        })
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) -> io::Result<()> {
        if self.ring.submission().is_full() {
            self.ring.submit()?;
        }
        // SAFETY: poll and splice entries hold fds, lengths and flags only, no pointer into
        // this process's memory, so nothing the kernel reads later can dangle.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))
    }

    /// One-shot poll for `events` (POLLIN, POLLOUT...); completes with the ready mask.
    pub fn poll(&mut self, tag: u64, fd: RawFd, events: u32) -> io::Result<()> {
        self.push(
            opcode::PollAdd::new(types::Fd(fd), events)
                .build()
                .user_data(tag),
        )
    }

    /// splice(2) of up to `len` bytes from `from` to `to` (one of them a pipe); completes with
    /// the count moved, 0 at the source's end, or -errno.
    pub fn splice(
        &mut self,
        tag: u64,
        from: RawFd,
        to: RawFd,
        len: u32,
        nonblocking: bool,
    ) -> io::Result<()> {
        let mut flags = libc::SPLICE_F_MOVE;
        if nonblocking {
            flags |= libc::SPLICE_F_NONBLOCK;
        }
        self.push(
            opcode::Splice::new(types::Fd(from), -1, types::Fd(to), -1, len)
                .flags(flags)
                .build()
                .user_data(tag),
        )
    }

    /// Submits what was pushed and waits until at least one completion is there, or at most
    /// `limit`.
    pub fn submit_and_wait(&mut self, limit: Option<std::time::Duration>) -> io::Result<()> {
        let waited = match limit {
            None => self.ring.submit_and_wait(1),
            Some(limit) => {
                let timespec = types::Timespec::new()
                    .sec(limit.as_secs())
                    .nsec(limit.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&timespec);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match waited {
            Ok(_) => Ok(()),
            Err(error) if matches!(error.raw_os_error(), Some(libc::EINTR | libc::ETIME)) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Moves the completions (tag, result) into `into`.
    pub fn reap(&mut self, into: &mut Vec<(u64, i32)>) {
        into.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
    }
}
