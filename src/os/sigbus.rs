//! Token files, model weights and checkpoints are memory-mapped (see mapfile), so a read that
//! fails after a file was opened (it was truncated or rewritten in place, or its disk or network
//! file system failed) does not return an error: the kernel sends SIGBUS, which kills the process
//! with "Bus error" and nothing else. While a mapping is watched, finch's handler turns that into
//! its usual one-line error, naming the file and the byte, and exits with status 1. Checkpoints
//! are written atomically (see fsutil), so stopping at any instant loses nothing; the advice set
//! by the caller says how to go on.
//!
//! A signal handler may not allocate or take locks, so everything it prints is formatted in
//! advance, and the watched regions form a list that is only ever added to (a region is switched
//! off, never freed).

use std::path::Path;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::OnceLock;

struct Region {
    start: usize,
    len: usize,
    /// "error: PATH: cannot read byte ": what comes before the offset.
    head: Box<[u8]>,
    /// " of its N bytes: ...": what comes after it.
    tail: Box<[u8]>,
    watched: AtomicBool,
    next: *const Region,
}

/// The most recently watched region; each points to the one watched before it.
static REGIONS: AtomicPtr<Region> = AtomicPtr::new(ptr::null_mut());
/// Appended to the message: how to go on ("; restore it, then continue with --resume DIR").
static ADVICE: AtomicPtr<String> = AtomicPtr::new(ptr::null_mut());
/// The SIGBUS action that was in place before ours (Rust's own, or the default), for faults
/// outside watched regions.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
/// Whether stderr is a terminal, where a progress bar may hold the current line.
static STDERR_IS_TERMINAL: AtomicBool = AtomicBool::new(false);

/// Watches `bytes`, the whole of the file at `path` mapped from offset 0, until the returned value
/// is dropped.
pub fn watch(bytes: &[u8], path: &Path) -> Watch {
    install_handler();
    let region = Box::leak(Box::new(Region {
        start: bytes.as_ptr() as usize,
        len: bytes.len(),
        head: format!("error: {}: cannot read byte ", path.display()).into_bytes().into(),
        tail: format!(" of its {} bytes: the file shrank, or its disk failed, while finch was reading it", bytes.len())
            .into_bytes()
            .into(),
        watched: AtomicBool::new(true),
        next: ptr::null(),
    }));
    let mut head = REGIONS.load(Ordering::Acquire);
    loop {
        region.next = head;
        match REGIONS.compare_exchange(head, region, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => break,
            Err(now) => head = now,
        }
    }
    Watch(region)
}

/// A watched region; dropping it stops the watch (before the mapping goes away).
pub struct Watch(&'static Region);

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.watched.store(false, Ordering::Release);
    }
}

/// Sets what the message says after naming the failure, e.g. "; restore it, then continue with
/// --resume runs/a". Meant to be called a few times per process: earlier texts are kept (leaked),
/// since the handler may be reading one at any moment.
pub fn set_advice(advice: String) {
    ADVICE.store(Box::leak(Box::new(advice)), Ordering::Release);
}

fn install_handler() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        use std::io::IsTerminal;
        STDERR_IS_TERMINAL.store(std::io::stderr().is_terminal(), Ordering::Relaxed);
        // SAFETY: sigaction with a zeroed struct, an empty mask and a handler of the SA_SIGINFO
        // signature; the previous action is written into `previous`.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &action, &mut previous) == 0 {
                let _ = PREVIOUS.set(previous);
            }
        }
    });
}

extern "C" fn on_sigbus(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; the regions and advice
    // are leaked, so every pointer read here stays valid; write and _exit are async-signal-safe.
    unsafe {
        let address = (*info).si_addr() as usize;
        let mut region = REGIONS.load(Ordering::Acquire) as *const Region;
        while let Some(r) = region.as_ref() {
            if r.watched.load(Ordering::Acquire) && address >= r.start && address - r.start < r.len {
                if STDERR_IS_TERMINAL.load(Ordering::Relaxed) {
                    write_stderr(b"\n");
                }
                write_stderr(&r.head);
                let mut digits = [0u8; 20];
                write_stderr(decimal(address - r.start, &mut digits));
                write_stderr(&r.tail);
                if let Some(advice) = ADVICE.load(Ordering::Acquire).as_ref() {
                    write_stderr(advice.as_bytes());
                }
                write_stderr(b"\n");
                libc::_exit(1);
            }
            region = r.next;
        }
        // Not a token file: give the fault back to the handler that was there before. Returning
        // repeats the faulting access, which then goes to that handler.
        match PREVIOUS.get() {
            Some(previous) => libc::sigaction(libc::SIGBUS, previous, ptr::null_mut()),
            None => {
                libc::signal(libc::SIGBUS, libc::SIG_DFL);
                0
            }
        };
    }
}

/// `n` in decimal, written into the end of `buf`.
fn decimal(mut n: usize, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Writes to stderr with write(2) alone: safe inside a signal handler.
pub(crate) fn write_stderr(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: writes from a valid slice to fd 2.
        let n = unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
        if n <= 0 {
            return;
        }
        bytes = &bytes[n as usize..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_print_in_decimal() {
        let mut buf = [0u8; 20];
        assert_eq!(decimal(0, &mut buf), b"0");
        assert_eq!(decimal(1_234_567, &mut buf), b"1234567");
        assert_eq!(decimal(usize::MAX, &mut buf), usize::MAX.to_string().as_bytes());
    }
}
