//! Crash-safe file writing: a temporary file beside the target, synced, then renamed over it,
//! then the directory synced. A reader (or a resumed run) sees the old file or the new one,
//! never a torn one. Also: free space, and one-line explanations of write failures.

use anyhow::{Context, Result};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Test hook, read only here: milliseconds to sleep between syncing the temporary file and
/// renaming it into place, so a test can SIGKILL a process inside that window
/// (tests/reliability.rs). Unset (always, outside tests), it does nothing.
pub const PAUSE_BEFORE_RENAME_ENV: &str = "FINCH_TEST_PAUSE_BEFORE_RENAME_MS";

/// `dir/.name.tmp`: hidden, beside the target so the rename never crosses file systems.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// The mode a new file gets from `File::create`: rw for all, less the process's umask (read from
/// /proc, since umask(2) can only be read by setting it).
fn new_file_mode() -> u32 {
    let umask = std::fs::read_to_string("/proc/self/status").ok().and_then(|status| {
        let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
        u32::from_str_radix(line.trim(), 8).ok()
    });
    0o666 & !umask.unwrap_or(0o022)
}

/// Creates `path` atomically; `write` receives the temporary path and must create that file.
/// On failure the temporary file is removed and `path` is left as it was. The file gets the mode
/// any new file would (0644 under the usual umask), however `write` created it: the safetensors
/// crate's temporary files are 0600.
pub fn write_atomically_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = temp_path(path);
    let result = write(&tmp).and_then(|()| {
        fs::set_permissions(&tmp, fs::Permissions::from_mode(new_file_mode()))
            .with_context(|| format!("{}: cannot set its permissions", tmp.display()))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("{}: cannot sync to disk", tmp.display()))?;
        if let Some(ms) = std::env::var(PAUSE_BEFORE_RENAME_ENV).ok().and_then(|v| v.parse().ok()) {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
        sync_dir(path);
        Ok(())
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates `path` atomically with the given bytes.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically_with(path, |tmp| {
        let mut f = File::create(tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("{}: cannot write", tmp.display()))
    })
}

/// Removes what interrupted atomic writes in `dir` left behind: our `.NAME.tmp` files, and the
/// `.tmpXXXXXX` files the safetensors crate writes before renaming them to ours. Call it only
/// while holding the directory's lock (no other writer). Returns how many files it removed.
pub fn remove_stale_temp_files(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with('.') && name.ends_with(".tmp") && name.len() > 5;
        let safetensors = name.starts_with(".tmp") && name.len() == 10;
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if (ours || safetensors) && is_file && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Makes a rename durable. Best effort: some file systems refuse to open directories.
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Creates a directory (and parents), naming it in the error.
pub fn create_dir(dir: &Path, flag: &str) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| match os_problem(&e) {
        Some(problem) => anyhow::anyhow!("{flag} {}: cannot create the directory ({problem})", dir.display()),
        None => anyhow::Error::new(e).context(format!("{flag} {}: cannot create the directory", dir.display())),
    })
}

/// The lock file of a run directory: held (flock) for the whole run; it holds the owner's pid.
pub const LOCK_FILE: &str = ".lock";

/// Takes `dir/.lock` with an exclusive advisory lock (flock), or fails at once, naming the pid
/// of the run that holds it. The kernel releases the lock when the process ends, however it
/// ends, so a crashed run never blocks the next. `flag` is `--out` or `--resume`. Returns the
/// open file, which must be kept for the whole run.
pub fn lock_run_dir(dir: &Path, flag: &str) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let d = dir.display();
    let explain = |e: io::Error, what: &str| {
        explain_write_error(
            anyhow::Error::new(e).context(format!("{}: cannot {what}", path.display())),
            flag,
            dir,
            None,
        )
    };
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| explain(e, "open"))?;
    // SAFETY: flock on a file descriptor we own and keep open; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => {
                let holder = fs::read_to_string(&path).ok().and_then(|s| s.trim().parse::<u32>().ok());
                let pid = holder.map(|p| format!(" (pid {p})")).unwrap_or_default();
                let advice = if flag == "--resume" {
                    "wait for it to finish or stop it first"
                } else {
                    "wait for it or choose another --out"
                };
                anyhow::bail!("{d} is in use by another finch run{pid}; {advice}");
            }
            Some(libc::ENOLCK | libc::EOPNOTSUPP) => {
                eprintln!("warning: {flag} {d}: this file system cannot lock files; do not start a second run on it");
                return Ok(file);
            }
            _ => return Err(anyhow::Error::new(e).context(format!("{flag} {d}: cannot lock {LOCK_FILE}"))),
        }
    }
    let pid = format!("{}\n", std::process::id());
    file.set_len(0).and_then(|()| file.write_all(pid.as_bytes())).map_err(|e| explain(e, "write"))?;
    Ok(file)
}

/// Bytes this process may still write on the file system holding `dir` (statvfs; None where
/// that is unknown).
#[allow(clippy::unnecessary_cast)] // statvfs's field types differ between platforms
pub fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a valid NUL-terminated string and `st` points to writable memory the
    // size of a statvfs, which the call fills when it returns 0.
    if unsafe { libc::statvfs(c_path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    // SAFETY: geteuid has no preconditions.
    let blocks = if unsafe { libc::geteuid() } == 0 { st.f_bfree } else { st.f_bavail };
    Some((blocks as u64).saturating_mul(st.f_frsize as u64))
}

/// What an OS error means for a writer, in a few words, for the errors users can fix
/// (disk full, read-only, permissions, quota); None for the rest.
pub fn os_problem(e: &io::Error) -> Option<&'static str> {
    match e.raw_os_error()? {
        libc::ENOSPC => Some("no space left on device"),
        libc::EROFS => Some("read-only file system"),
        libc::EACCES | libc::EPERM => Some("permission denied"),
        libc::EDQUOT => Some("disk quota exceeded"),
        _ => None,
    }
}

/// The first `io::Error` in an error's chain of causes.
pub fn io_cause(e: &anyhow::Error) -> Option<&io::Error> {
    e.chain().find_map(|c| c.downcast_ref::<io::Error>())
}

/// Rewrites a failed write under `{flag} {dir}` as one clear line when its cause is one a user
/// can fix: `--out D: cannot write (read-only file system)`, or for a full disk
/// `--out D: no space left on device (needed ~X MiB for the checkpoint, Y MiB free)`, where
/// `needed` is (bytes, what they are for). Other errors pass through unchanged.
pub fn explain_write_error(e: anyhow::Error, flag: &str, dir: &Path, needed: Option<(u64, &str)>) -> anyhow::Error {
    let Some(problem) = io_cause(&e).and_then(os_problem) else { return e };
    let d = dir.display();
    let full = matches!(io_cause(&e).and_then(|c| c.raw_os_error()), Some(libc::ENOSPC | libc::EDQUOT));
    match (full, needed) {
        (true, Some((bytes, what))) => {
            let free = free_space(dir).map(|f| format!(", {} free", mib(f))).unwrap_or_default();
            anyhow::anyhow!("{flag} {d}: {problem} (needed ~{} for {what}{free})", mib(bytes))
        }
        (true, None) => anyhow::anyhow!("{flag} {d}: {problem}"),
        (false, _) => anyhow::anyhow!("{flag} {d}: cannot write ({problem})"),
    }
}

/// Refuses to start a write of about `bytes` into `dir` when the file system has less free:
/// `--out D: not enough space left on device (needed ~X MiB for WHAT, Y MiB free)`.
pub fn check_free_space(dir: &Path, flag: &str, bytes: u64, what: &str) -> Result<()> {
    match free_space(dir) {
        Some(free) if free < bytes => anyhow::bail!(
            "{flag} {}: not enough space left on device (needed ~{} for {what}, {} free)",
            dir.display(),
            mib(bytes),
            mib(free)
        ),
        _ => Ok(()),
    }
}

/// Sizes as MiB with one decimal, for the messages above.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed_write(errno: i32) -> anyhow::Error {
        let io = io::Error::from_raw_os_error(errno);
        anyhow::Error::new(io).context("/runs/a/.checkpoint.safetensors.tmp: cannot write")
    }

    #[test]
    fn write_errors_users_can_fix_become_one_clear_line() {
        let dir = Path::new("/nonexistent-finch-dir");
        let full = explain_write_error(failed_write(libc::ENOSPC), "--out", dir, Some((3 << 20, "the checkpoint")));
        assert_eq!(
            format!("{full:#}"),
            "--out /nonexistent-finch-dir: no space left on device (needed ~3.0 MiB for the checkpoint)"
        );
        let ro = explain_write_error(failed_write(libc::EROFS), "--out", dir, Some((1, "the checkpoint")));
        assert_eq!(format!("{ro:#}"), "--out /nonexistent-finch-dir: cannot write (read-only file system)");
        let denied = explain_write_error(failed_write(libc::EACCES), "--save", dir, None);
        assert_eq!(format!("{denied:#}"), "--save /nonexistent-finch-dir: cannot write (permission denied)");
        // Anything else keeps its original chain.
        let other = explain_write_error(failed_write(libc::EIO), "--out", dir, None);
        assert!(format!("{other:#}").starts_with("/runs/a/.checkpoint.safetensors.tmp: cannot write: "));
    }

    #[test]
    fn a_full_disk_reports_the_free_space_of_the_directory() {
        let dir = std::env::temp_dir();
        let e = explain_write_error(failed_write(libc::ENOSPC), "--out", &dir, Some((5 << 20, "the checkpoint")));
        let msg = format!("{e:#}");
        assert!(
            msg.contains("no space left on device (needed ~5.0 MiB for the checkpoint, ")
                && msg.ends_with(" MiB free)"),
            "{msg}"
        );
        assert!(free_space(&dir).is_some());
        assert!(check_free_space(&dir, "--out", u64::MAX, "the checkpoint").is_err());
        assert!(check_free_space(&dir, "--out", 1, "the checkpoint").is_ok());
    }

    #[test]
    fn a_failed_atomic_write_leaves_the_old_file_and_no_temporary() {
        let dir = std::env::temp_dir().join(format!("finch-fsutil-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.bin");
        write_atomically(&path, b"old").unwrap();
        let err = write_atomically_with(&path, |tmp| {
            fs::write(tmp, b"half")?;
            Err(anyhow::Error::new(io::Error::from_raw_os_error(libc::ENOSPC)))
        });
        assert!(err.is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert!(!temp_path(&path).exists());
        fs::write(dir.join(".tmpAbC123"), b"x").unwrap();
        fs::write(temp_path(&path), b"x").unwrap();
        assert_eq!(remove_stale_temp_files(&dir), 2);
        assert_eq!(fs::read(&path).unwrap(), b"old");
        fs::remove_dir_all(&dir).unwrap();
    }
}
