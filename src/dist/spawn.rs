//! `finch train --nproc-per-node N`: finch as its own launcher on one machine, as torchrun is.
//! It starts N copies of itself, each with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
//! MASTER_ADDR=127.0.0.1, a free MASTER_PORT) and FINCH_LOCAL_LAUNCH=1, then watches them:
//! - a rank that fails makes the launcher stop the others (SIGKILL, after a grace period in which
//!   they usually end by themselves, their collectives failing) and exit with that rank's status;
//! - Ctrl-C or SIGTERM to the launcher is passed on once to every rank, which checkpoint and stop
//!   together as one process does. The ranks run in their own process group, so a terminal's
//!   Ctrl-C reaches them only through the launcher (once), and each dies with the launcher
//!   (PR_SET_PDEATHSIG) if it is killed.

use anyhow::{Context, Result};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// A job's exit status, already reported by the ranks: the launcher exits with it silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobStatus(pub i32);

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the job ended with status {}", self.0)
    }
}

impl std::error::Error for JobStatus {}

/// Set in the ranks a local launch starts: they are ranks, not launchers.
pub const LOCAL_LAUNCH_ENV: &str = "FINCH_LOCAL_LAUNCH";

/// How long the other ranks get to end on their own after one failed (their collectives fail
/// with it, and each says so in one line) before the launcher kills them: a checkpoint cannot
/// be gathered without the failed rank anyway, and every write is atomic.
const GRACE: Duration = Duration::from_secs(10);

/// The signal the launcher received, or 0.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    RECEIVED.store(signal, Ordering::Release);
}

/// Whether this process is a rank that finch's own launcher started.
pub fn is_local_rank() -> bool {
    std::env::var_os(LOCAL_LAUNCH_ENV).is_some()
}

/// A free TCP port on this machine for the ranks' rendezvous.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).context("cannot find a free local port")?;
    Ok(listener.local_addr()?.port())
}

/// Starts `n` ranks running this program with `args`, waits for them, and returns the job's
/// exit status: 0 when every rank succeeded, else the first failing rank's.
pub fn launch_local(n: usize, args: &[std::ffi::OsString]) -> Result<JobStatus> {
    let exe = std::env::current_exe().context("cannot find finch's own executable to start the ranks")?;
    let port = free_port()?.to_string();
    let mut children: Vec<(usize, Child)> = Vec::new();
    for rank in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.args(args)
            .env(LOCAL_LAUNCH_ENV, "1")
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port);
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(child) => children.push((rank, child)),
            Err(e) => {
                stop_all(&mut children, libc::SIGKILL);
                anyhow::bail!("cannot start rank {rank} of {n} ({}): {e}", exe.display());
            }
        }
    }
    install_handlers();
    watch(children).map(JobStatus)
}

fn install_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a plain handler that stores one atomic.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

fn stop_all(children: &mut [(usize, Child)], signal: libc::c_int) {
    for (_, child) in children.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            // SAFETY: kill on a child we started and have not reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
    }
}

/// The status as a shell reports it: the exit code, or 128 + the signal.
fn code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn watch(mut children: Vec<(usize, Child)>) -> Result<i32> {
    let n = children.len();
    let mut result = 0;
    let mut forwarded = false;
    let mut kill_at: Option<Instant> = None;
    while !children.is_empty() {
        let signal = RECEIVED.swap(0, Ordering::AcqRel);
        if signal != 0 {
            if forwarded {
                stop_all(&mut children, libc::SIGKILL); // a second signal: at once
            } else {
                stop_all(&mut children, signal);
                forwarded = true;
                if result == 0 {
                    result = 128 + signal;
                }
            }
        }
        let mut i = 0;
        while i < children.len() {
            match children[i].1.try_wait() {
                Ok(Some(status)) => {
                    let (rank, _) = children.remove(i);
                    if !status.success() && result == 0 {
                        result = code(status);
                        if status.code().is_none() {
                            // A rank killed by a signal printed nothing itself.
                            eprintln!("rank {rank} of {n} was killed ({status}); stopping the other ranks");
                        }
                        kill_at = Some(Instant::now() + GRACE);
                    }
                }
                Ok(None) => i += 1,
                Err(e) => anyhow::bail!("cannot watch rank {}: {e}", children[i].0),
            }
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            stop_all(&mut children, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(result)
}
