//! Which process of which job this is: the rank, the world size and the local rank, read from
//! the environment a launcher sets (torchrun, Slurm's srun, Open MPI's mpirun, or finch's own
//! `--nproc-per-node`), and where the ranks meet (MASTER_ADDR:MASTER_PORT). Every inconsistent
//! environment is one line naming the variable and what was expected.

use anyhow::{bail, Context, Result};

/// This process's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// The rank among those on this machine: the GPU it uses.
    pub local_rank: usize,
    /// Where rank 0 hands out the NCCL id: (host, port). None for a single process.
    pub master: Option<(String, u16)>,
    /// Which launcher's variables these came from, for messages.
    pub launcher: &'static str,
}

impl World {
    /// One process alone.
    pub fn single() -> World {
        World { rank: 0, size: 1, local_rank: 0, master: None, launcher: "none" }
    }

    pub fn is_single(&self) -> bool {
        self.size == 1
    }

    /// "rank 3 of 8" for messages.
    pub fn describe(&self) -> String {
        format!("rank {} of {}", self.rank, self.size)
    }
}

static CURRENT: std::sync::OnceLock<World> = std::sync::OnceLock::new();

/// Records this process's place in the job, for messages (`current`).
pub fn set_current(world: &World) {
    let _ = CURRENT.set(world.clone());
}

/// This process's place in the job, once known: main prefixes the errors of a job's ranks with
/// it ("rank 2 of 4: ...").
pub fn current() -> Option<&'static World> {
    CURRENT.get()
}

/// The variables of each launcher: rank, world size, local rank.
const TORCHRUN: [&str; 3] = ["RANK", "WORLD_SIZE", "LOCAL_RANK"];
const OPEN_MPI: [&str; 3] = ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"];
/// srun sets the step's task count (SLURM_STEP_NUM_TASKS); SLURM_NTASKS is the allocation's,
/// which a batch script sees too without being one of several tasks.
const SLURM: [&str; 3] = ["SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"];

/// The world described by `env` (a lookup of environment variables): torchrun's variables first
/// (they are what `--nproc-per-node` sets too), then Open MPI's (mpirun inside a Slurm allocation
/// sets both), then srun's; none of them: a single process.
pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<World> {
    let (names, launcher) = if env(TORCHRUN[0]).is_some() || env(TORCHRUN[1]).is_some() {
        (TORCHRUN, "torchrun")
    } else if env(OPEN_MPI[0]).is_some() {
        (OPEN_MPI, "mpirun")
    } else if env(SLURM[0]).is_some() && env(SLURM[1]).is_some() {
        (SLURM, "srun")
    } else {
        return Ok(World::single());
    };
    let number = |name: &str| -> Result<Option<usize>> {
        match env(name) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<usize>()
                .map(Some)
                .map_err(|_| anyhow::anyhow!("{name}={v} ({launcher}'s environment): expected a whole number")),
        }
    };
    let rank =
        number(names[0])?.with_context(|| format!("{} is set but {} is not ({launcher})", names[1], names[0]))?;
    let size =
        number(names[1])?.with_context(|| format!("{} is set but {} is not ({launcher})", names[0], names[1]))?;
    if size == 0 {
        bail!("{}=0 ({launcher}'s environment): the job needs at least 1 process", names[1]);
    }
    if rank >= size {
        bail!(
            "{}={rank} but {}={size} ({launcher}'s environment): the rank must be below the world size",
            names[0],
            names[1]
        );
    }
    let local_rank = match number(names[2])? {
        Some(l) => l,
        None if size == 1 => 0,
        None => bail!("{} is not set ({launcher}'s environment): finch needs it to pick this process's GPU", names[2]),
    };
    if local_rank >= size {
        bail!("{}={local_rank} but the world has {size} processes ({launcher}'s environment)", names[2]);
    }
    let master = match size {
        1 => None,
        _ => Some(master_address(env, launcher)?),
    };
    Ok(World { rank, size, local_rank, master, launcher })
}

/// MASTER_ADDR and MASTER_PORT; under srun without them, the first node of the job
/// (SLURM_JOB_NODELIST) and a port derived from the job id, so that every task agrees.
fn master_address(env: &dyn Fn(&str) -> Option<String>, launcher: &str) -> Result<(String, u16)> {
    let slurm_host = || env("SLURM_JOB_NODELIST").and_then(|list| first_host(&list));
    let host = match env("MASTER_ADDR").filter(|h| !h.trim().is_empty()) {
        Some(h) => h.trim().to_string(),
        None if launcher == "srun" => slurm_host().with_context(|| {
            "MASTER_ADDR is not set and SLURM_JOB_NODELIST names no node: set MASTER_ADDR to the first node's address"
        })?,
        None => bail!(
            "MASTER_ADDR is not set ({launcher}): set it to the address of the machine running rank 0, and \
             MASTER_PORT to a free port on it"
        ),
    };
    let port = match env("MASTER_PORT") {
        Some(p) => match p.trim().parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => bail!("MASTER_PORT={p}: expected a port number from 1 to 65535"),
        },
        None if launcher == "srun" => {
            let job: u64 = env("SLURM_JOB_ID").and_then(|j| j.trim().parse().ok()).unwrap_or(0);
            20000 + (job % 20000) as u16
        }
        None => bail!("MASTER_PORT is not set ({launcher}): set it to a free port on MASTER_ADDR's machine"),
    };
    Ok((host, port))
}

/// The first host of a Slurm host list: "node[07-09,12],gpu3" → "node07", "a,b" → "a".
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let end = list.find([',', '[']).unwrap_or(list.len());
    let prefix = &list[..end];
    if list[end..].starts_with('[') {
        let inside = &list[end + 1..list[end..].find(']').map(|i| end + i)?];
        let first = inside.split([',', '-']).next()?.trim();
        if first.is_empty() || !first.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        return Some(format!("{prefix}{first}"));
    }
    (!prefix.is_empty()).then(|| prefix.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world(vars: &[(&str, &str)]) -> Result<World> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        from_env(&|name| map.get(name).cloned())
    }

    fn error(vars: &[(&str, &str)]) -> String {
        format!("{:#}", world(vars).unwrap_err())
    }

    #[test]
    fn no_launcher_is_one_process() {
        assert_eq!(world(&[]).unwrap(), World::single());
        // A Slurm batch script (no srun step) is one process too.
        assert_eq!(world(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8")]).unwrap(), World::single());
    }

    #[test]
    fn torchrun_mpirun_and_srun_are_read() {
        let t = [
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ];
        let w = world(&t).unwrap();
        assert_eq!((w.rank, w.size, w.local_rank, w.launcher), (3, 8, 1, "torchrun"));
        assert_eq!(w.master, Some(("10.0.0.1".to_string(), 29500)));

        let m = [
            ("OMPI_COMM_WORLD_RANK", "5"),
            ("OMPI_COMM_WORLD_SIZE", "16"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "5"),
            ("MASTER_ADDR", "head"),
            ("MASTER_PORT", "1234"),
            // mpirun inside a Slurm allocation: Open MPI's variables win.
            ("SLURM_PROCID", "0"),
            ("SLURM_STEP_NUM_TASKS", "1"),
        ];
        let w = world(&m).unwrap();
        assert_eq!((w.rank, w.size, w.local_rank, w.launcher), (5, 16, 5, "mpirun"));

        let s = [
            ("SLURM_PROCID", "6"),
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_LOCALID", "2"),
            ("SLURM_JOB_NODELIST", "gpu[017-020]"),
            ("SLURM_JOB_ID", "123456"),
        ];
        let w = world(&s).unwrap();
        assert_eq!((w.rank, w.size, w.local_rank, w.launcher), (6, 8, 2, "srun"));
        assert_eq!(w.master, Some(("gpu017".to_string(), 20000 + (123456 % 20000) as u16)));
        // MASTER_ADDR and MASTER_PORT override srun's defaults.
        let w = world(&[&s[..], &[("MASTER_ADDR", "10.1.1.1"), ("MASTER_PORT", "4000")]].concat()).unwrap();
        assert_eq!(w.master, Some(("10.1.1.1".to_string(), 4000)));
    }

    #[test]
    fn a_world_of_one_needs_no_address() {
        let w = world(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap();
        assert_eq!((w.size, w.master), (1, None));
    }

    #[test]
    fn bad_environments_are_one_line_each() {
        let cases: [(&[(&str, &str)], &str); 9] = [
            (
                &[("RANK", "0"), ("WORLD_SIZE", "0")],
                "WORLD_SIZE=0 (torchrun's environment): the job needs at least 1 process",
            ),
            (&[("RANK", "4"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0")], "RANK=4 but WORLD_SIZE=4"),
            (&[("RANK", "x"), ("WORLD_SIZE", "4")], "RANK=x (torchrun's environment): expected a whole number"),
            (&[("WORLD_SIZE", "4")], "WORLD_SIZE is set but RANK is not"),
            (&[("RANK", "1"), ("WORLD_SIZE", "2")], "LOCAL_RANK is not set"),
            (&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")], "MASTER_ADDR is not set (torchrun)"),
            (
                &[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "0")],
                "MASTER_PORT=0: expected a port number from 1 to 65535",
            ),
            (
                &[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_LOCAL_RANK", "1")],
                "MASTER_ADDR is not set (mpirun)",
            ),
            (
                &[("SLURM_PROCID", "0"), ("SLURM_STEP_NUM_TASKS", "2"), ("SLURM_LOCALID", "0")],
                "SLURM_JOB_NODELIST names no node",
            ),
        ];
        for (vars, want) in cases {
            let got = error(vars);
            assert!(got.contains(want), "{vars:?}: {got}");
            assert!(!got.contains('\n'), "{got}");
        }
    }

    #[test]
    fn slurm_host_lists() {
        assert_eq!(first_host("node[07-09,12],gpu3").as_deref(), Some("node07"));
        assert_eq!(first_host("a,b").as_deref(), Some("a"));
        assert_eq!(first_host("single").as_deref(), Some("single"));
        assert_eq!(first_host("n[3]").as_deref(), Some("n3"));
        assert_eq!(first_host("").as_deref(), None);
        assert_eq!(first_host("n[x-y]").as_deref(), None);
    }
}
