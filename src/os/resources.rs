//! What the machine lets this process have: host memory (the kernel's estimate, lowered by the
//! memory limit of the process's cgroup, as containers set it), the address-space limit
//! (`ulimit -v`), and byte counts written as people read them.

use std::path::{Path, PathBuf};

pub fn human_bytes(n: usize) -> String {
    match n as f64 / (1u64 << 20) as f64 {
        mib if mib >= 1024.0 => format!("{:.1} GiB", mib / 1024.0),
        mib => format!("{mib:.1} MiB"),
    }
}

/// `--threads` above this is a mistake (and would spend minutes starting threads): no machine
/// finch runs on has as many cores.
pub const MAX_THREADS: usize = 1024;

/// Checks a `--threads` value: at least 1, at most [`MAX_THREADS`].
pub fn check_threads(n: usize) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match n {
        0 => anyhow::bail!("--threads must be at least 1"),
        n if n > MAX_THREADS => {
            anyhow::bail!("--threads must be at most {MAX_THREADS}, got {n} (this machine has {cores} cores)")
        }
        _ => Ok(()),
    }
}

/// Host memory this process can still take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AvailableMemory {
    pub bytes: u64,
    /// Set when a cgroup's memory limit, not the machine, is what bounds `bytes`:
    /// "the memory limit of cgroup /x (512.0 MiB)".
    pub limited_by: Option<String>,
}

/// Memory this process can allocate without swapping or being killed: the kernel's MemAvailable,
/// or less when the process's cgroup (or one above it) has a memory limit, as a container or a
/// batch scheduler sets. Linux only; None where the machine does not say.
pub fn available_memory() -> Option<AvailableMemory> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let machine = mem_available(&meminfo)?;
    let limit = cgroups("memory").iter().filter_map(|(dir, v2)| cgroup_room(dir, *v2)).min();
    Some(match limit {
        Some(room) if room.available < machine => AvailableMemory {
            bytes: room.available,
            limited_by: Some(format!(
                "the memory limit of cgroup {} ({})",
                room.name,
                human_bytes(room.limit as usize)
            )),
        },
        _ => AvailableMemory { bytes: machine, limited_by: None },
    })
}

/// The cgroup directories whose `controller` settings (memory, blkio, …) apply to this process:
/// for each mounted cgroup v1 hierarchy of that controller, and the cgroup v2 hierarchy, the
/// process's own cgroup, then each ancestor up to the mount, as (directory, whether it is v2).
pub fn cgroups(controller: &str) -> Vec<(PathBuf, bool)> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    cgroup_dirs(controller, &cgroup, &mountinfo)
}

/// MemAvailable of /proc/meminfo, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The address-space limit of this process (`ulimit -v`, RLIMIT_AS) in bytes; None if unlimited.
pub fn address_space_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit struct, which `limit` is.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } == 0;
    (ok && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// Room left under one cgroup's memory limit.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct CgroupRoom {
    /// First, so `min` picks the tightest cgroup.
    available: u64,
    limit: u64,
    name: String,
}

/// [`cgroups`], from the text of /proc/self/cgroup and /proc/self/mountinfo.
fn cgroup_dirs(controller: &str, cgroup: &str, mountinfo: &str) -> Vec<(PathBuf, bool)> {
    let mut dirs = Vec::new();
    for line in cgroup.lines() {
        // "hierarchy-id:controllers:path"; v2 is "0::path".
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else { continue };
        let v2 = controllers.is_empty();
        if !v2 && !controllers.split(',').any(|c| c == controller) {
            continue;
        }
        for mount in mountinfo.lines() {
            // "id parent dev root mountpoint options [tags] - fstype source superoptions"
            let Some((left, right)) = mount.split_once(" - ") else { continue };
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let (Some(&root), Some(&point), Some(&fstype)) = (left.get(3), left.get(4), right.first()) else {
                continue;
            };
            let matches = if v2 {
                fstype == "cgroup2"
            } else {
                fstype == "cgroup" && right.get(2).is_some_and(|o| o.split(',').any(|c| c == controller))
            };
            if !matches {
                continue;
            }
            // The mount shows the hierarchy from `root` down (a container sees its own part).
            let relative = match root {
                "/" => Some(path),
                _ => path.strip_prefix(root).filter(|r| r.is_empty() || r.starts_with('/')),
            };
            let Some(relative) = relative else { continue };
            let point = Path::new(point);
            let mut dir = point.join(relative.trim_start_matches('/'));
            loop {
                dirs.push((dir.clone(), v2));
                if dir == point || !dir.pop() {
                    break;
                }
            }
        }
    }
    dirs
}

/// The limit of the cgroup in `dir`, and what is left under it: the limit, less the memory in
/// use, plus the inactive file cache, which the kernel drops before it kills anything.
fn cgroup_room(dir: &Path, v2: bool) -> Option<CgroupRoom> {
    let read = |file: &str| std::fs::read_to_string(dir.join(file)).ok();
    let number = |file: &str| read(file)?.trim().parse::<u64>().ok();
    let (limit, usage, cache_key) = if v2 {
        (number("memory.max")?, number("memory.current")?, "inactive_file")
    } else {
        (number("memory.limit_in_bytes")?, number("memory.usage_in_bytes")?, "total_inactive_file")
    };
    // cgroup v1 writes "no limit" as a page-rounded i64::MAX; v2 as "max", which fails to parse.
    if limit >= 1 << 62 {
        return None;
    }
    let stat = read("memory.stat").unwrap_or_default();
    let inactive_file = stat
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(key, _)| *key == cache_key)
        .and_then(|(_, v)| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let in_use = usage.saturating_sub(inactive_file);
    let name = dir.display().to_string();
    Some(CgroupRoom { available: limit.saturating_sub(in_use), limit, name })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 31 0:40 /docker/abc /mnt/cg rw,relatime - cgroup cgroup rw,cpuset,memory";

    #[test]
    fn the_memory_hierarchies_are_found_with_every_ancestor() {
        let cgroup = "8:pids:/\n4:memory:/batch/job7\n2:cpu:/\n0::/user.slice/x.scope\n";
        let dirs = cgroup_dirs("memory", cgroup, MOUNTINFO);
        let paths: Vec<(String, bool)> = dirs.iter().map(|(d, v2)| (d.display().to_string(), *v2)).collect();
        let expected = [
            ("/sys/fs/cgroup/memory/batch/job7", false),
            ("/sys/fs/cgroup/memory/batch", false),
            ("/sys/fs/cgroup/memory", false),
            ("/sys/fs/cgroup/unified/user.slice/x.scope", true),
            ("/sys/fs/cgroup/unified/user.slice", true),
            ("/sys/fs/cgroup/unified", true),
        ];
        assert_eq!(paths, expected.map(|(p, v2)| (p.to_string(), v2)));
    }

    #[test]
    fn a_mount_of_part_of_the_hierarchy_is_entered_below_its_root() {
        // A container whose v1 hierarchy is mounted from /docker/abc down.
        let mountinfo = MOUNTINFO.lines().last().unwrap();
        let dirs = cgroup_dirs("memory", "3:cpuset,memory:/docker/abc/inner\n", mountinfo);
        assert_eq!(dirs, [(PathBuf::from("/mnt/cg/inner"), false), (PathBuf::from("/mnt/cg"), false)]);
        // A path outside the mount's part is not this mount's.
        assert!(cgroup_dirs("memory", "3:cpuset,memory:/other\n", mountinfo).is_empty());
        assert!(cgroup_dirs("memory", "3:cpuset,memory:/docker/abcdef\n", mountinfo).is_empty());
    }

    #[test]
    fn cgroup_room_is_the_limit_less_what_cannot_be_reclaimed() {
        let dir = std::env::temp_dir().join(format!("finch-cgroup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |f: &str, s: &str| std::fs::write(dir.join(f), s).unwrap();
        write("memory.limit_in_bytes", "1073741824\n");
        write("memory.usage_in_bytes", "600000000\n");
        write("memory.stat", "cache 5\ninactive_file 7\ntotal_inactive_file 100000000\n");
        let room = cgroup_room(&dir, false).unwrap();
        assert_eq!((room.available, room.limit), (1073741824 - 500000000, 1073741824));
        write("memory.limit_in_bytes", "9223372036854771712\n");
        assert_eq!(cgroup_room(&dir, false), None, "v1's 'no limit'");

        write("memory.max", "max\n");
        write("memory.current", "5\n");
        assert_eq!(cgroup_room(&dir, true), None, "v2's 'no limit'");
        write("memory.max", "1000\n");
        write("memory.stat", "anon 3\ninactive_file 4\n");
        assert_eq!(cgroup_room(&dir, true).unwrap().available, 1000 - 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mem_available_is_read_in_bytes() {
        assert_eq!(mem_available("MemTotal: 100 kB\nMemAvailable:    2048 kB\n"), Some(2 << 20));
        assert_eq!(mem_available("MemTotal: 100 kB\n"), None);
    }
}
