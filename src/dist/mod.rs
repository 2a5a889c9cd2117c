//! Many processes, one job: which rank this process is and how the ranks find each other
//! (`world`: the environment of torchrun, srun, mpirun or finch's own launcher; `rendezvous`:
//! the NCCL id handed out over TCP), and `finch train --nproc-per-node`, which starts the local
//! ranks itself (`spawn`). The collectives themselves are NCCL's (`cuda::nccl`).

pub mod rendezvous;
pub mod spawn;
pub mod world;
