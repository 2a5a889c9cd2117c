//! Ctrl-C (SIGINT) and SIGTERM stop a training run cleanly instead of killing it. SIGTERM is
//! what `kill`, systemd, Kubernetes and batch schedulers (Slurm at a preemption or the end of a
//! time limit) send, with a grace period before SIGKILL. Killed at once, a run would lose every
//! step since its last checkpoint, which with `--checkpoint-every 1000` can be hours of work.
//!
//! While a run directory is being trained, the first such signal only sets a flag: the step under
//! way finishes, a checkpoint of it is written, and finch exits with status 128 + the signal's
//! number (130, 143), as a shell reports a process killed by it, so that scripts and schedulers
//! see an unfinished run. A second signal stops at once: every write is atomic (see fsutil), so
//! that loses only the step under way and never the last checkpoint.
//!
//! The handler may not allocate or take locks, so its notices are formatted in advance.

use std::path::Path;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, Ordering};

use crate::os::sigbus::write_stderr;

/// The first stop signal received while a watch is installed, or 0.
static REQUESTED: AtomicI32 = AtomicI32::new(0);
static NOTICES: AtomicPtr<Notices> = AtomicPtr::new(ptr::null_mut());
/// Whether the run directory holds a checkpoint, which a second signal leaves intact.
static HAS_CHECKPOINT: AtomicBool = AtomicBool::new(false);
/// Whether the handler prints nothing.
static QUIET: AtomicBool = AtomicBool::new(false);
/// Whether stderr is a terminal, where a progress bar may hold the current line.
static STDERR_IS_TERMINAL: AtomicBool = AtomicBool::new(false);

const SIGNALS: [(libc::c_int, &str); 2] = [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")];

/// What the handler prints, per signal in `SIGNALS` order.
struct Notices {
    first: [Box<[u8]>; 2],
    again: [Box<[u8]>; 2],
    again_before_any_checkpoint: [Box<[u8]>; 2],
}

/// A stop signal that ended a run after its checkpoint was written. `main` prints it and exits
/// with `exit_code()`.
#[derive(Debug)]
pub struct Interrupted {
    pub signal: libc::c_int,
    pub message: String,
}

impl Interrupted {
    /// 128 + the signal number: what a shell reports for a process the signal killed.
    pub fn exit_code(&self) -> u8 {
        (128 + self.signal).clamp(0, 255) as u8
    }
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Interrupted {}

/// The name of a stop signal ("SIGINT", "SIGTERM").
pub fn signal_name(signal: libc::c_int) -> &'static str {
    SIGNALS.iter().find(|(s, _)| *s == signal).map_or("a signal", |(_, name)| name)
}

/// Stop signals are caught while this value lives; dropping it puts the previous actions back.
pub struct StopOnSignal {
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

impl StopOnSignal {
    /// Catches SIGINT and SIGTERM for a run writing `run_dir`, which may already hold a
    /// checkpoint. A signal the process was started ignoring (`nohup`, a background job of a
    /// script) stays ignored. `quiet`: print no notices (a rank other than a job's rank 0).
    pub fn install(run_dir: &Path, has_checkpoint: bool, quiet: bool) -> StopOnSignal {
        QUIET.store(quiet, Ordering::Relaxed);
        use std::io::IsTerminal;
        STDERR_IS_TERMINAL.store(std::io::stderr().is_terminal(), Ordering::Relaxed);
        let dir = run_dir.display();
        let notices = Notices {
            first: SIGNALS.map(|(signal, name)| {
                let again = if signal == libc::SIGINT { "Ctrl-C again" } else { "a second SIGTERM" };
                format!("{name}: stopping after the step under way, once its checkpoint is written ({again} stops at once)\n")
                    .into_bytes()
                    .into()
            }),
            again: SIGNALS.map(|(_, name)| {
                format!(
                    "{name} again: stopped at once, without finishing the step; the last checkpoint in {dir} is intact: \
                     continue with finch train --resume {dir}\n"
                )
                .into_bytes()
                .into()
            }),
            again_before_any_checkpoint: SIGNALS.map(|(_, name)| {
                format!(
                    "{name} again: stopped at once, before the run's first checkpoint, so nothing is saved: start it \
                     again from step 1 with finch train --resume {dir} --restart\n"
                )
                .into_bytes()
                .into()
            }),
        };
        // Leaked: the handler may be reading an earlier value at any moment.
        NOTICES.store(Box::leak(Box::new(notices)), Ordering::Release);
        REQUESTED.store(0, Ordering::Release);
        HAS_CHECKPOINT.store(has_checkpoint, Ordering::Release);
        let mut previous = Vec::new();
        for (signal, _) in SIGNALS {
            // SAFETY: sigaction with zeroed structs, an empty mask and a handler of the plain
            // signature; the previous action is read first so an ignored signal stays ignored.
            unsafe {
                let mut before: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(signal, ptr::null(), &mut before) != 0 || before.sa_sigaction == libc::SIG_IGN {
                    continue;
                }
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_stop_signal as *const () as libc::sighandler_t;
                // Interrupted reads and writes restart rather than fail with EINTR.
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                if libc::sigaction(signal, &action, ptr::null_mut()) == 0 {
                    previous.push((signal, before));
                }
            }
        }
        StopOnSignal { previous }
    }

    /// Tells the handler a checkpoint now exists.
    pub fn checkpoint_written(&self) {
        HAS_CHECKPOINT.store(true, Ordering::Release);
    }

    /// The first stop signal received since `install`, if any.
    pub fn requested(&self) -> Option<libc::c_int> {
        match REQUESTED.load(Ordering::Acquire) {
            0 => None,
            signal => Some(signal),
        }
    }
}

impl Drop for StopOnSignal {
    fn drop(&mut self) {
        for (signal, action) in &self.previous {
            // SAFETY: restores an action read by sigaction.
            unsafe { libc::sigaction(*signal, action, ptr::null_mut()) };
        }
    }
}

extern "C" fn on_stop_signal(signal: libc::c_int) {
    let first = REQUESTED.compare_exchange(0, signal, Ordering::AcqRel, Ordering::Acquire).is_ok();
    let index = SIGNALS.iter().position(|(s, _)| *s == signal).unwrap_or(0);
    // SAFETY: the notices are leaked, so the pointer stays valid; write and _exit are
    // async-signal-safe.
    unsafe {
        if let Some(notices) = NOTICES.load(Ordering::Acquire).as_ref().filter(|_| !QUIET.load(Ordering::Relaxed)) {
            if STDERR_IS_TERMINAL.load(Ordering::Relaxed) {
                write_stderr(b"\n");
            }
            write_stderr(if first {
                &notices.first[index]
            } else if HAS_CHECKPOINT.load(Ordering::Acquire) {
                &notices.again[index]
            } else {
                &notices.again_before_any_checkpoint[index]
            });
        }
        if !first {
            libc::_exit(128 + signal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_what_a_shell_reports_for_the_signal() {
        let stop = |signal| Interrupted { signal, message: String::new() };
        assert_eq!(stop(libc::SIGINT).exit_code(), 130);
        assert_eq!(stop(libc::SIGTERM).exit_code(), 143);
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
    }
}
