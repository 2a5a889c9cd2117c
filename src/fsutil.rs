//! Crash-safe file writing: a temporary file beside the target, synced, then renamed over it,
//! then the directory synced. A reader (or a resumed run) sees the old file or the new one,
//! never a torn one.

use anyhow::{Context, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// `dir/.name.tmp`: hidden, beside the target so the rename never crosses file systems.
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Creates `path` atomically; `write` receives the temporary path and must create that file.
pub fn write_atomically_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_path(path);
    let result = write(&tmp).and_then(|()| {
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("{}: cannot sync to disk", tmp.display()))?;
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
    fs::create_dir_all(dir).with_context(|| format!("{flag} {}: cannot create the directory", dir.display()))
}
