//! Resource limits and failing data, each met with one clear line (with the numbers) or handled:
//! token "files" that are directories, pipes or devices; an address-space limit too small for the
//! memory map; a token file that shrinks under a running run (SIGBUS); a cgroup memory limit below
//! what a run needs, and token data larger than that limit; a token file on a slow disk.
//!
//! The last three make real cgroups, loop devices and file systems (Linux, root). Where the machine
//! refuses, the test writes "skipped: … (reason)" straight to the terminal and returns.

mod common;

use common::{
    assert_one_line_error, deterministic_step_lines, finch, fixture, report, text, tokens, TempDir, TINY_MODEL,
};
use finch::formats::checkpoint;
use finch::formats::tokens::write_llmc_u16;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn train_args<'a>(data: &'a str, steps: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["train", "--device", "cpu", "--data", data, "--batch-size", "2", "--steps", steps];
    args.extend_from_slice(&TINY_MODEL);
    args.extend_from_slice(extra);
    args
}

#[test]
fn data_that_is_a_directory_a_pipe_or_a_device_gets_one_line() {
    let dir = TempDir::new("notafile");
    let d = dir.0.to_str().unwrap();
    assert_one_line_error(
        &finch(&train_args(d, "2", &[])),
        &[&format!("{d}: is a directory; name the token files in it, e.g. '{d}/train_*.bin'")],
    );
    // Opening a pipe would wait for a writer forever: it must be refused before that.
    let pipe = dir.path("pipe");
    let made = Command::new("mkfifo").arg(&pipe).status();
    if made.is_ok_and(|s| s.success()) {
        let p = pipe.to_str().unwrap();
        let out = finch_within(&train_args(p, "2", &[]), Duration::from_secs(60));
        assert_one_line_error(&out, &[&format!("{p}: is a pipe; finch memory-maps the files it reads")]);
        // So are the model weights of --init (and checkpoints): they are mapped the same way.
        let model = dir.path("model");
        std::fs::create_dir(&model).unwrap();
        std::fs::copy(format!("{}/init/config.json", fixture()), model.join("config.json")).unwrap();
        std::fs::rename(&pipe, model.join("model.safetensors")).unwrap();
        let m = model.to_str().unwrap();
        let tokens = format!("{}/tokens.bin", fixture());
        let out = finch_within(
            &["train", "--device", "cpu", "--data", &tokens, "--init", m, "--steps", "1", "--batch-size", "1"],
            Duration::from_secs(60),
        );
        assert_one_line_error(&out, &[&format!("{m}/model.safetensors: is a pipe; finch memory-maps")]);
    } else {
        report("test data_that_is_a_directory_a_pipe_or_a_device_gets_one_line ... pipe part skipped: mkfifo failed");
    }
    assert_one_line_error(&finch(&train_args("/dev/null", "2", &[])), &["/dev/null: is not a regular file"]);
}

/// Runs finch and kills it if it takes longer than `limit` (the test then fails on its output).
fn finch_within(args: &[&str], limit: Duration) -> Output {
    let mut child =
        Command::new(common::finch_bin()).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("finch {args:?} ran past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// An llm.c header claiming `count` uint16 tokens, in a sparse file of the matching size: gigabytes
/// that take no disk space.
fn sparse_token_file(path: &Path, count: i32) {
    let header = finch::formats::tokens::llmc_header(1, count);
    std::fs::write(path, &header).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.set_len(header.len() as u64 + 2 * count as u64).unwrap();
}

#[test]
fn a_token_file_beyond_the_address_space_limit_gets_one_line_with_the_numbers() {
    let dir = TempDir::new("ulimit");
    let data = dir.path("big.bin");
    sparse_token_file(&data, 1_500_000_000); // 2.8 GiB
    let data = data.to_str().unwrap();
    // ulimit -v 2000000 KiB (1.9 GiB): room for finch itself, not for the map.
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 2000000 && exec \"$@\"")
        .arg("sh")
        .arg(common::finch_bin())
        .args(train_args(data, "2", &[]))
        .output()
        .unwrap();
    assert_one_line_error(
        &out,
        &[&format!(
            "{data}: cannot memory-map its 2.8 GiB: this process may use at most 1.9 GiB of address space \
             (ulimit -v 2000000)"
        )],
    );
}

#[test]
fn a_token_file_that_shrinks_under_a_run_stops_it_in_one_line_and_resume_recovers() {
    let dir = TempDir::new("shrink");
    let data = dir.path("train.bin");
    let tokens = tokens(200_000, 50, 7);
    write_llmc_u16(&data, &tokens).unwrap();
    let (d, run, reference) = (data.to_str().unwrap(), dir.path("run"), dir.path("reference"));
    let (r, reference) = (run.to_str().unwrap(), reference.to_str().unwrap());
    let steps = "2000";
    assert!(finch(&train_args(d, steps, &["--out", reference])).status.success());

    let mut child = Command::new(common::finch_bin())
        .args(train_args(d, steps, &["--checkpoint-every", "1", "--out", r]))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while checkpoint::load(&run).ok().flatten().is_none_or(|ck| ck.state.step < 3) {
        assert!(Instant::now() < deadline && child.try_wait().unwrap().is_none(), "the run made no checkpoint");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Truncated under the run: its next read of the map faults.
    std::fs::OpenOptions::new().write(true).open(&data).unwrap().set_len(0).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_one_line_error(
        &out,
        &[
            &format!("error: {d}: cannot read byte "),
            &format!(" of its {} bytes: the file shrank, or its disk failed", 1024 + 2 * tokens.len()),
            &format!("; restore it, then continue with --resume {r}"),
        ],
    );
    let stopped_at = checkpoint::load(&run).unwrap().expect("the last checkpoint loads").state.step;
    assert!((3..2000).contains(&stopped_at), "stopped after step {stopped_at}");

    write_llmc_u16(&data, &tokens).unwrap();
    let resumed = finch(&["train", "--resume", r]);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    assert_eq!(
        deterministic_step_lines(&run.join("log.jsonl")),
        deterministic_step_lines(&Path::new(reference).join("log.jsonl"))
    );
}

/// A cgroup made for one test, under the test process's own one, removed when dropped.
struct Cgroup {
    dir: PathBuf,
    v2: bool,
}

impl Cgroup {
    /// A new child cgroup with `controller` (v1 name: memory, blkio); Err says why not.
    fn create(controller: &str, name: &str) -> Result<Cgroup, String> {
        let (own, v2) = finch::os::resources::cgroups(controller)
            .into_iter()
            .find(|(_, v2)| !v2)
            .or_else(|| finch::os::resources::cgroups(controller).into_iter().next())
            .ok_or_else(|| format!("no {controller} cgroup hierarchy is mounted"))?;
        let dir = own.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Cgroup { dir, v2 })
    }

    fn set(&self, file: &str, value: &str) -> Result<(), String> {
        std::fs::write(self.dir.join(file), value).map_err(|e| format!("cannot write {value:?} to {file}: {e}"))
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// finch with `args`, started inside this cgroup.
    fn finch(&self, args: &[&str]) -> Output {
        Command::new("sh")
            .arg("-c")
            .arg("echo $$ > \"$1\" && shift && exec \"$@\"")
            .arg("sh")
            .arg(self.dir.join("cgroup.procs"))
            .arg(common::finch_bin())
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The processes in it have exited; the kernel may take a moment to let it go.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Drops the file at `path` from the page cache, so that the next reader reads (and is charged
/// for) it afresh.
fn drop_from_page_cache(path: &Path) {
    let file = std::fs::File::open(path).unwrap();
    file.sync_all().unwrap();
    // SAFETY: advice on a file descriptor that is open.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

#[test]
fn a_memory_limit_below_the_run_is_refused_in_one_line_and_data_larger_than_it_still_trains() {
    let test = "a_memory_limit_below_the_run_is_refused_in_one_line_and_data_larger_than_it_still_trains";
    let cgroup = match Cgroup::create("memory", "finch-test-memory") {
        Ok(c) => c,
        Err(why) => return report(&format!("test {test} ... skipped: cannot make a memory cgroup ({why})")),
    };
    let limit = 64u64 << 20;
    let limit_file = if cgroup.v2 { "memory.max" } else { "memory.limit_in_bytes" };
    if let Err(why) = cgroup.set(limit_file, &limit.to_string()) {
        return report(&format!("test {test} ... skipped: cannot limit a cgroup's memory ({why})"));
    }
    let dir = TempDir::new("cgroup-memory");

    // A run needing about 200 MiB, in 64 MiB: refused before it allocates, where it used to be
    // killed by the kernel with no message at all.
    let small = dir.path("small.bin");
    write_llmc_u16(&small, &tokens(5_000, 50, 3)).unwrap();
    let s = small.to_str().unwrap();
    let big_model =
        ["--n-layer", "4", "--n-head", "4", "--n-embd", "512", "--context-length", "64", "--batch-size", "4"];
    let out = cgroup.finch(&[&train_args(s, "2", &[])[..], &big_model].concat());
    assert_one_line_error(
        &out,
        &[
            "error: not enough memory: training needs ",
            &format!("under the memory limit of cgroup {} (64.0 MiB)", cgroup.dir.display()),
        ],
    );

    // The same for a resumed run, checked before its checkpoint is loaded: reading this one
    // (about 145 MiB) used to get the run killed by the kernel without a word.
    let run = dir.path("big-run");
    let r = run.to_str().unwrap();
    let short_steps = ["--out", r, "--batch-size", "1", "--seq-len", "8"];
    let out = finch(&[&train_args(s, "1", &[])[..], &big_model, &short_steps].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = cgroup.finch(&["train", "--resume", r, "--steps", "2"]);
    assert_one_line_error(
        &out,
        &[
            "error: not enough memory: training needs ",
            " activations at B=1, T=8) but ",
            &format!("under the memory limit of cgroup {} (64.0 MiB)", cgroup.dir.display()),
        ],
    );

    // 96 MiB of tokens, uncached, in 64 MiB: the memory map pages them in and out as it goes.
    let big = dir.path("big.bin");
    write_llmc_u16(&big, &vec![0u16; 48 << 20]).unwrap();
    drop_from_page_cache(&big);
    let out = cgroup.finch(&train_args(big.to_str().unwrap(), "3", &[]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("step 3/3"));
    // The limit was really reached (and pages reclaimed), so the data did not fit.
    let hit = if cgroup.v2 {
        cgroup.read("memory.events").lines().any(|l| l.starts_with("max ") && l != "max 0")
    } else {
        cgroup.read("memory.failcnt").trim().parse::<u64>().unwrap_or(0) > 0
    };
    assert!(hit, "the cgroup never reached its limit: the test proved nothing");
}

/// A loop device holding an ext4 file system, mounted on `dir`; all undone when dropped.
struct LoopDisk {
    device: String,
    mount: PathBuf,
}

impl LoopDisk {
    fn create(image: &Path, mount: &Path, size_mib: u64) -> Result<LoopDisk, String> {
        let run = |cmd: &str, args: &[&str]| -> Result<String, String> {
            let out = Command::new(cmd).args(args).output().map_err(|e| format!("{cmd}: {e}"))?;
            match out.status.success() {
                true => Ok(text(&out.stdout).trim().to_string()),
                false => Err(format!("{cmd} {}: {}", args.join(" "), text(&out.stderr).trim())),
            }
        };
        std::fs::File::create(image).unwrap().set_len(size_mib << 20).unwrap();
        let device = run("losetup", &["--find", "--show", image.to_str().unwrap()])?;
        let disk = LoopDisk { device, mount: mount.to_owned() };
        run("mkfs.ext4", &["-q", &disk.device])?;
        std::fs::create_dir_all(mount).unwrap();
        run("mount", &[&disk.device, mount.to_str().unwrap()])?;
        Ok(disk)
    }

    /// Unmounts and mounts again: nothing of it stays in the page cache.
    fn remount(&self) {
        let m = self.mount.to_str().unwrap();
        assert!(Command::new("umount").arg(m).status().unwrap().success());
        assert!(Command::new("mount").args([&self.device, m]).status().unwrap().success());
    }

    /// "MAJOR:MINOR" of the device, as cgroups name it.
    fn numbers(&self) -> String {
        let name = Path::new(&self.device).file_name().unwrap().to_str().unwrap();
        std::fs::read_to_string(format!("/sys/block/{name}/dev")).unwrap().trim().to_string()
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).output();
        let _ = Command::new("losetup").args(["-d", &self.device]).output();
    }
}

#[test]
fn a_token_file_on_a_slow_disk_shows_progress_and_a_warning_with_the_read_rate() {
    let test = "a_token_file_on_a_slow_disk_shows_progress_and_a_warning_with_the_read_rate";
    let dir = TempDir::new("slowdisk");
    let disk = match LoopDisk::create(&dir.path("disk.img"), &dir.path("mnt"), 32) {
        Ok(d) => d,
        Err(why) => return report(&format!("test {test} ... skipped: cannot make a loop-device file system ({why})")),
    };
    let cgroup = match Cgroup::create("blkio", "finch-test-slow") {
        Ok(c) => c,
        Err(why) => return report(&format!("test {test} ... skipped: cannot make an I/O cgroup ({why})")),
    };
    // 512 KiB/s: a slow network file system.
    let bps = 512 << 10;
    let throttled = match cgroup.v2 {
        true => cgroup.set("io.max", &format!("{} rbps={bps}", disk.numbers())),
        false => cgroup.set("blkio.throttle.read_bps_device", &format!("{} {bps}", disk.numbers())),
    };
    if let Err(why) = throttled {
        return report(&format!("test {test} ... skipped: cannot throttle the disk ({why})"));
    }
    // 3 MiB: about 6 s at that rate.
    let data = disk.mount.join("train.bin");
    write_llmc_u16(&data, &tokens(3 << 19, 50, 5)).unwrap();
    disk.remount();
    let d = data.to_str().unwrap();
    let out = cgroup.finch(&train_args(d, "3", &[]));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("step 3/3"), "{stdout}");
    // Progress while it reads, then the rate, which must be the throttle's (0.52 MB/s) give or take.
    assert!(
        stdout.lines().any(|l| l.starts_with(&format!("checking {d}: ")) && l.contains(" MB/s, about ")),
        "{stdout}"
    );
    let checked = stdout.lines().find(|l| l.starts_with(&format!("checked {d}: 3.1 MB in "))).expect(&stdout);
    let rate: f64 = checked.rsplit(", ").next().unwrap().trim_end_matches(" MB/s").parse().unwrap();
    assert!((0.3..=0.8).contains(&rate), "{checked}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with(&format!("warning: {d} reads at only {rate:.1} MB/s")), "{stderr}");
}
