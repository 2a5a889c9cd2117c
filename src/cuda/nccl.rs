//! NCCL, the collectives of data-parallel training, loaded at run time like the driver (cudarc's
//! dynamic loading; a missing libnccl is one line). One communicator per process, on the GPU's
//! stream; buffers are raw device pointers (`DPtr`), as everywhere in the GPU backend. A step
//! waits for its collectives with a deadline (`wait`), polling NCCL's asynchronous error, so a
//! dead or hung rank ends the job with one line instead of hanging it.

use super::{DPtr, Gpu};
use anyhow::{bail, Context, Result};
use cudarc::nccl::sys;
use std::time::{Duration, Instant};

/// The element types finch exchanges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F64,
    Bf16,
}

impl Dtype {
    fn nccl(self) -> sys::ncclDataType_t {
        match self {
            Dtype::F32 => sys::ncclDataType_t::ncclFloat32,
            Dtype::F64 => sys::ncclDataType_t::ncclFloat64,
            Dtype::Bf16 => sys::ncclDataType_t::ncclBfloat16,
        }
    }
}

/// A communicator of `size` ranks, this one `rank`.
pub struct Nccl {
    comm: sys::ncclComm_t,
    pub rank: usize,
    pub size: usize,
    /// How long `wait` lets a step's collectives take (--dist-timeout).
    pub timeout: Duration,
}

// SAFETY: the communicator is used from one thread at a time (the training loop's).
unsafe impl Send for Nccl {}

fn check(r: sys::ncclResult_t, what: &str) -> Result<()> {
    if r == sys::ncclResult_t::ncclSuccess {
        return Ok(());
    }
    // SAFETY: ncclGetErrorString returns a static string.
    let text = unsafe { std::ffi::CStr::from_ptr(sys::ncclGetErrorString(r)) }.to_string_lossy().into_owned();
    bail!("{what}: {text} ({r:?}); NCCL_DEBUG=INFO says more")
}

impl Nccl {
    /// Whether libnccl can be loaded (cudarc would panic on the first call otherwise).
    pub fn available() -> bool {
        // SAFETY: only tries to open the library.
        unsafe { sys::is_culib_present() }
    }

    fn require() -> Result<()> {
        if !Self::available() {
            bail!(
                "NCCL (libnccl.so.2) could not be loaded: multi-GPU training needs it; install NCCL (pip install \
                 nvidia-nccl-cu13 provides it) and add its lib directory to LD_LIBRARY_PATH"
            );
        }
        Ok(())
    }

    /// A new unique id (rank 0 makes it and hands it out).
    pub fn unique_id() -> Result<[u8; 128]> {
        Self::require()?;
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        // SAFETY: writes the id.
        check(unsafe { sys::ncclGetUniqueId(&mut id) }, "cannot create an NCCL id")?;
        Ok(id.internal.map(|c| c as u8))
    }

    /// Joins the communicator `id` as `rank` of `size`, on `gpu` (whose context is current).
    pub fn init(gpu: &Gpu, rank: usize, size: usize, id: [u8; 128], timeout: Duration) -> Result<Nccl> {
        Self::require()?;
        gpu.ctx.bind_to_thread().context("cannot bind the GPU")?;
        let id = sys::ncclUniqueId { internal: id.map(|b| b as std::ffi::c_char) };
        let mut comm = std::ptr::null_mut();
        // SAFETY: comm is written on success.
        let r = unsafe { sys::ncclCommInitRank(&mut comm, size as i32, id, rank as i32) };
        check(r, &format!("rank {rank} of {size}: cannot join the NCCL communicator"))?;
        Ok(Nccl { comm, rank, size, timeout })
    }

    fn stream(gpu: &Gpu) -> sys::cudaStream_t {
        gpu.stream.cu_stream() as sys::cudaStream_t
    }

    fn who(&self) -> String {
        format!("rank {} of {}", self.rank, self.size)
    }

    /// recv[i] = Σ_ranks send[i] over `count` elements (in place when send == recv).
    pub fn all_reduce_sum(&self, gpu: &Gpu, send: DPtr, recv: DPtr, count: usize, dtype: Dtype) -> Result<()> {
        // SAFETY: device pointers of `count` elements on this GPU's stream.
        let r = unsafe {
            sys::ncclAllReduce(
                send.0 as *const _,
                recv.0 as *mut _,
                count,
                dtype.nccl(),
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                Self::stream(gpu),
            )
        };
        check(r, &format!("{}: ncclAllReduce", self.who()))
    }

    /// recv (`count` elements) = Σ_ranks of this rank's `count`-element block of send
    /// (size · count elements).
    pub fn reduce_scatter_sum(&self, gpu: &Gpu, send: DPtr, recv: DPtr, count: usize, dtype: Dtype) -> Result<()> {
        // SAFETY: as above; send holds size · count elements.
        let r = unsafe {
            sys::ncclReduceScatter(
                send.0 as *const _,
                recv.0 as *mut _,
                count,
                dtype.nccl(),
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                Self::stream(gpu),
            )
        };
        check(r, &format!("{}: ncclReduceScatter", self.who()))
    }

    /// recv (size · count elements) = every rank's `count` elements of send, in rank order
    /// (in place when send is this rank's block of recv).
    pub fn all_gather(&self, gpu: &Gpu, send: DPtr, recv: DPtr, count: usize, dtype: Dtype) -> Result<()> {
        // SAFETY: as above.
        let r = unsafe {
            sys::ncclAllGather(send.0 as *const _, recv.0 as *mut _, count, dtype.nccl(), self.comm, Self::stream(gpu))
        };
        check(r, &format!("{}: ncclAllGather", self.who()))
    }

    /// buf (`count` elements) = rank `root`'s.
    pub fn broadcast(&self, gpu: &Gpu, buf: DPtr, count: usize, dtype: Dtype, root: usize) -> Result<()> {
        // SAFETY: as above.
        let r = unsafe {
            sys::ncclBroadcast(
                buf.0 as *const _,
                buf.0 as *mut _,
                count,
                dtype.nccl(),
                root as i32,
                self.comm,
                Self::stream(gpu),
            )
        };
        check(r, &format!("{}: ncclBroadcast", self.who()))
    }

    /// NCCL's asynchronous error (a dead peer, a network failure), as one line.
    pub fn async_error(&self) -> Result<()> {
        let mut r = sys::ncclResult_t::ncclSuccess;
        // SAFETY: reads the communicator's state.
        check(
            unsafe { sys::ncclCommGetAsyncError(self.comm, &mut r) },
            &format!("{}: ncclCommGetAsyncError", self.who()),
        )?;
        check(r, &format!("{}: a collective failed", self.who()))
    }

    /// Waits for everything on the GPU's stream, collectives included, for at most the timeout,
    /// watching for NCCL's errors; on either, aborts the communicator (which unblocks the
    /// collectives) and returns the one-line error.
    pub fn wait(&self, gpu: &Gpu) -> Result<()> {
        use cudarc::driver::sys::{cuStreamQuery, CUresult};
        let deadline = Instant::now() + self.timeout;
        loop {
            // SAFETY: queries this process's stream.
            let done = unsafe { cuStreamQuery(gpu.stream.cu_stream()) };
            if let Err(e) = self.async_error() {
                self.abort();
                return Err(e);
            }
            match done {
                CUresult::CUDA_SUCCESS => return Ok(()),
                CUresult::CUDA_ERROR_NOT_READY => {}
                other => bail!("{}: the GPU failed while waiting for the step: {other:?}", self.who()),
            }
            if Instant::now() >= deadline {
                self.abort();
                bail!(
                    "{}: the step's collectives did not finish within {} s (--dist-timeout): another rank died, hung \
                     or is far slower; NCCL_DEBUG=INFO says more",
                    self.who(),
                    self.timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Ends the communicator at once, without waiting for other ranks.
    fn abort(&self) {
        // SAFETY: the communicator is not used afterwards except by Drop, which skips it.
        unsafe { sys::ncclCommAbort(self.comm) };
        ABORTED.with(|a| a.set(self.comm as usize));
    }
}

thread_local! {
    /// The communicator `abort` ended, so Drop does not destroy it again.
    static ABORTED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl Drop for Nccl {
    fn drop(&mut self) {
        if ABORTED.with(|a| a.get()) != self.comm as usize {
            // SAFETY: the communicator is live and no longer used.
            unsafe { sys::ncclCommDestroy(self.comm) };
        }
    }
}
