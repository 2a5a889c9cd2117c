//! Read-only memory maps of the large files finch reads: token files, model weights and
//! checkpoints. One way to open them, so each gets the same care: what is not a regular file is
//! refused before it is opened (opening a named pipe would wait forever for a writer), a failed
//! map is explained with the numbers (mostly an address-space limit), and the mapping is watched
//! so that a file that shrinks or fails while it is read stops finch in one line (see sigbus).
//!
//! Mapping rather than reading also keeps the file's bytes in the page cache, which the kernel
//! may drop under pressure, instead of in the process's own memory: a checkpoint is parsed
//! without holding a second copy of it.

use crate::os::resources::{address_space_limit, human_bytes};
use crate::os::sigbus;
use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// A whole file, mapped read-only from offset 0; derefs to its bytes.
pub struct MappedFile {
    /// Declared before `map` so the watch ends before the map is unmapped.
    _watch: Option<sigbus::Watch>,
    map: Mmap,
}

impl MappedFile {
    /// Maps the file at `path`. `directory_hint` is appended when `path` is a directory (for
    /// token files: "; name the token files in it, e.g. …").
    pub fn open(path: &Path, directory_hint: &str) -> Result<MappedFile> {
        let name = path.display();
        // Before opening: opening a named pipe would wait for a writer.
        let metadata = std::fs::metadata(path).with_context(|| format!("{name}: cannot open"))?;
        if !metadata.is_file() {
            let on_disk = "finch memory-maps the files it reads, so they must be files on disk";
            match metadata.file_type() {
                t if t.is_dir() => bail!("{name}: is a directory{directory_hint}"),
                t if t.is_fifo() => bail!("{name}: is a pipe; {on_disk}"),
                _ => bail!("{name}: is not a regular file; {on_disk}"),
            }
        }
        let file = std::fs::File::open(path).with_context(|| format!("{name}: cannot open"))?;
        let size = file.metadata().with_context(|| format!("{name}: cannot read its size"))?.len();
        // SAFETY: the map is read-only. The file may still be truncated or fail underneath us;
        // such a read raises SIGBUS, which the watch turns into an error naming the file.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| map_error(e, path, size))?;
        let watch = sigbus::watch(&map, path);
        Ok(MappedFile { _watch: Some(watch), map })
    }

    /// An anonymous map holding `bytes` (in-memory token streams), not watched.
    pub fn from_bytes(bytes: &[u8]) -> MappedFile {
        let mut map = memmap2::MmapMut::map_anon(bytes.len().max(1)).expect("anonymous map");
        map[..bytes.len()].copy_from_slice(bytes);
        MappedFile { _watch: None, map: map.make_read_only().expect("read-only map") }
    }
}

impl std::ops::Deref for MappedFile {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map
    }
}

/// What a mapping failure means, with the numbers: mostly an address-space limit.
fn map_error(e: std::io::Error, path: &Path, size: u64) -> anyhow::Error {
    let name = path.display();
    let file = human_bytes(size as usize);
    match (e.raw_os_error(), address_space_limit()) {
        (Some(libc::ENOMEM), Some(limit)) => anyhow!(
            "{name}: cannot memory-map its {file}: this process may use at most {} of address space \
             (ulimit -v {}), too little for the data and the model together; raise the limit (ulimit -v unlimited)",
            human_bytes(limit as usize),
            limit / 1024
        ),
        (Some(libc::ENOMEM), None) => anyhow!(
            "{name}: cannot memory-map its {file}: the system refused the address space ({e}); check \
             vm.overcommit_memory and vm.max_map_count"
        ),
        _ => anyhow!("{name}: cannot memory-map its {file} ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_or_a_device_is_refused_in_one_line_and_a_file_maps_whole() {
        let dir = std::env::temp_dir().join(format!("finch-mapfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = MappedFile::open(&dir, "; try a file in it").err().unwrap().to_string();
        assert_eq!(e, format!("{}: is a directory; try a file in it", dir.display()));
        let e = MappedFile::open(Path::new("/dev/null"), "").err().unwrap().to_string();
        assert!(e.starts_with("/dev/null: is not a regular file; finch memory-maps"), "{e}");
        let e = MappedFile::open(&dir.join("missing"), "").err().unwrap();
        assert!(format!("{e:#}").contains("missing: cannot open: No such file"), "{e:#}");
        let file = dir.join("bytes");
        std::fs::write(&file, b"0123456789").unwrap();
        assert_eq!(&*MappedFile::open(&file, "").unwrap(), b"0123456789");
        assert_eq!(&MappedFile::from_bytes(b"ab")[..2], b"ab");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
