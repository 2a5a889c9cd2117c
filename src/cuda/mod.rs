//! The CUDA backend: our own kernels (kernels/*.cu, compiled to PTX by build.rs and embedded),
//! loaded with cudarc at run time. Nothing here links against CUDA: with no driver or no GPU,
//! [`Gpu::open`] returns a one-line error and the rest of finch works on the CPU.
//!
//! - [`ops`]: one host function per kernel launch, with the CPU reference's argument order.
//! - [`model`]: the GPT-2 training step on the GPU, in the layout of `crate::model::layout`.
//! - [`check`]: every kernel against the CPU reference (`finch check`, and the GPU tests).

pub mod bench;
pub mod bench_memory;
pub mod check;
mod check_llama;
pub mod llama_model;
pub mod llama_ops;
pub mod model;
pub mod nccl;
pub mod ops;
pub mod profile;
pub mod ptx;

use anyhow::{bail, Context, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// Storage type of weights and activations on the GPU. Master weights, optimizer state,
/// gradients of parameters and all accumulation are fp32 either way.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bfloat16 weights and activations (the default on a GPU)
    Bf16,
    /// float32 everywhere: slower, for tight checks against the CPU reference
    F32,
}

impl Precision {
    /// Bytes per stored weight or activation.
    pub fn size(self) -> usize {
        match self {
            Precision::Bf16 => 2,
            Precision::F32 => 4,
        }
    }

    /// The suffix of this precision's kernel names (`matmul_bf16`, `matmul_f32`).
    pub fn suffix(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::F32 => "f32",
        }
    }

    /// Rounds `x` to what this precision stores (round to nearest even, as the kernels do).
    pub fn round(self, x: f32) -> f32 {
        match self {
            Precision::Bf16 => half::bf16::from_f32(x).to_f32(),
            Precision::F32 => x,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.suffix())
    }
}

/// A raw device address. Kernels take pointers as 64-bit integers; NULL means "absent".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DPtr(pub u64);

impl DPtr {
    pub const NULL: DPtr = DPtr(0);

    /// The address `elems` elements of `elem_size` bytes further on.
    pub fn add(self, elems: usize, elem_size: usize) -> DPtr {
        assert!(self != DPtr::NULL, "offset from a NULL device pointer");
        DPtr(self.0 + (elems * elem_size) as u64)
    }

    pub fn or_null(p: Option<DPtr>) -> DPtr {
        p.unwrap_or(DPtr::NULL)
    }
}

/// One kernel argument.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    Ptr(DPtr),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
}

impl From<DPtr> for Arg {
    fn from(p: DPtr) -> Arg {
        Arg::Ptr(p)
    }
}

/// A device allocation, freed on drop.
pub struct DeviceBuffer {
    slice: CudaSlice<u8>,
    pub ptr: DPtr,
    pub bytes: usize,
}

/// The GPU: one context, one stream, and every kernel of every family loaded.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
    pub capability: (i32, i32),
    /// Streaming multiprocessors: the memory-bound kernels' grids are sized from it (their
    /// results are not: see kernels/README.md).
    pub sm_count: u32,
    /// Which embedded kernels were loaded: "sm_90a cubin" (or "compute_90a PTX" when the cubin
    /// would not load) on Hopper (9.0), "sm_80 cubin" on other 8.x GPUs, "compute_80 PTX" elsewhere.
    pub ptx_arch: &'static str,
    functions: HashMap<String, CudaFunction>,
    /// FINCH_SYNC_EACH_LAUNCH=1: wait for each kernel, so a fault names the kernel that made it.
    sync_each_launch: bool,
    /// The dynamic shared memory each kernel has been allowed beyond the default.
    smem_allowed: std::sync::Mutex<HashMap<String, u32>>,
    /// While profiling (--profile): the events around every launch.
    pub profiler: std::sync::Mutex<Option<profile::Profiler>>,
}

/// Dynamic shared memory a kernel may use without asking (cuFuncSetAttribute).
const DEFAULT_DYNAMIC_SMEM: u32 = 48 << 10;

pub const NO_KERNELS: &str =
    "built without CUDA kernels: nvcc was not found at build time; install the CUDA toolkit, set CUDA_HOME and rebuild";

/// How every "there is no GPU here" error starts, so `--device auto` can say just that.
pub const NO_GPU: &str = "no GPU found";

impl Gpu {
    /// Opens device 0 and loads the kernels, or says in one line why it cannot. No GPU at all is
    /// said first: advice about building the kernels only matters where there is one.
    pub fn open() -> Result<Arc<Gpu>> {
        Self::open_ordinal(0)
    }

    /// Opens GPU `ordinal` (a data-parallel rank's LOCAL_RANK).
    pub fn open_ordinal(ordinal: usize) -> Result<Arc<Gpu>> {
        // cudarc loads libcuda lazily and panics if it is missing; ask first.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            bail!("{NO_GPU}: the NVIDIA driver (libcuda.so) is not installed");
        }
        let count = match CudaContext::device_count() {
            Ok(count) => count,
            Err(e) => bail!("{NO_GPU}: the NVIDIA driver cannot be initialised ({e})"),
        };
        if count < 1 {
            bail!("{NO_GPU}: the NVIDIA driver reports no device");
        }
        if ordinal >= count as usize {
            bail!(
                "this process wants GPU {ordinal} (its LOCAL_RANK) but this machine has {count}: start at most {count} \
                 process{} per machine",
                if count == 1 { "" } else { "es" }
            );
        }
        if ptx::FAMILIES.is_empty() {
            bail!("{NO_KERNELS}");
        }
        let ctx = CudaContext::new(ordinal).with_context(|| format!("cannot open CUDA device {ordinal}"))?;
        // One stream does everything in order, so cudarc's per-buffer event tracking is not needed.
        unsafe { ctx.disable_event_tracking() };
        let capability = ctx.compute_capability().context("cannot query the GPU's compute capability")?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".to_string());
        if capability.0 < 8 {
            bail!(
                "{name} has compute capability {}.{}; finch's kernels need 8.0 or later (Ampere, Hopper or newer)",
                capability.0,
                capability.1
            );
        }
        use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
        let sm_count = ctx.attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).context("cannot query the SM count")?;
        let sm_count = u32::try_from(sm_count).unwrap_or(1).max(1);
        let hopper = capability == (9, 0);
        let mut functions = HashMap::new();
        let mut all_cubins = true;
        for family in ptx::FAMILIES {
            let (ptx_text, cubin) = match capability {
                (9, 0) => (family.hopper, family.cubin_sm90a),
                (8, _) => (family.portable, family.cubin_sm80),
                _ => (family.portable, None),
            };
            // Machine code first: no JIT at start. Any failure (a driver too old for the cubin,
            // a fake driver that reads PTX only) falls back to the PTX.
            let from_cubin = cubin.and_then(|c| ctx.load_module(cudarc::nvrtc::Ptx::from_binary(c.to_vec())).ok());
            all_cubins &= from_cubin.is_some();
            let module = match from_cubin {
                Some(module) => module,
                None => ctx
                    .load_module(cudarc::nvrtc::Ptx::from_src(ptx_text))
                    .map_err(|e| ptx_load_error(e, family.name, ptx_text, &name))?,
            };
            for entry in ptx::entry_names(ptx_text) {
                let f = module
                    .load_function(entry)
                    .with_context(|| format!("cannot load kernel {entry} from the {} family", family.name))?;
                functions.insert(entry.to_string(), f);
            }
        }
        // A created stream, not the legacy default one: work on it can be captured into a graph.
        let stream = ctx.new_stream().context("cannot create a CUDA stream")?;
        let ptx_arch = match (hopper, all_cubins) {
            (true, true) => "sm_90a cubin",
            (true, false) => "compute_90a PTX",
            (false, true) => "sm_80 cubin",
            (false, false) => "compute_80 PTX",
        };
        let sync_each_launch = std::env::var("FINCH_SYNC_EACH_LAUNCH").is_ok_and(|v| v == "1");
        let smem_allowed = Default::default();
        let profiler = Default::default();
        Ok(Arc::new(Gpu {
            ctx,
            stream,
            name,
            capability,
            sm_count,
            ptx_arch,
            functions,
            sync_each_launch,
            smem_allowed,
            profiler,
        }))
    }

    /// Bytes of device memory (free, total).
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().context("cannot query GPU memory")
    }

    /// Allocates `bytes` of zeroed device memory; running out names the buffer and the numbers.
    pub fn alloc(&self, bytes: usize, what: &str) -> Result<DeviceBuffer> {
        let bytes = bytes.max(1);
        let slice = self.stream.alloc_zeros::<u8>(bytes).map_err(|e| {
            let free =
                self.memory().map(|(f, _)| crate::os::resources::human_bytes(f)).unwrap_or_else(|_| "unknown".into());
            anyhow::anyhow!(
                "out of GPU memory allocating {what} ({}; {free} free on {}): {e}",
                crate::os::resources::human_bytes(bytes),
                self.name
            )
        })?;
        let ptr = DPtr(slice.device_ptr(&self.stream).0);
        Ok(DeviceBuffer { slice, ptr, bytes })
    }

    fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).with_context(|| {
            format!(
                "kernel {name} is not among the {} kernels finch loaded ({}); the build's kernels/*.cu and \
                 src/cuda/ops.rs disagree: rebuild finch",
                self.functions.len(),
                self.ptx_arch
            )
        })
    }

    /// Launches kernel `name` on the stream.
    pub fn launch(&self, name: &str, grid: (u32, u32, u32), block: u32, args: &[Arg]) -> Result<()> {
        self.launch_with_smem(name, grid, block, 0, args)
    }

    /// Launches kernel `name` with `smem` bytes of dynamic shared memory. Above the 48 KiB every
    /// kernel may have, the kernel is first allowed that much (cuFuncSetAttribute), once.
    pub fn launch_with_smem(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        self.launch_measured(name, grid, block, smem, args, profile::Work::default())
    }

    /// Launches kernel `name` (as launch_with_smem) doing `work`, which --profile reports.
    pub fn launch_measured(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
        work: profile::Work,
    ) -> Result<()> {
        let mut profiler = self.profiler.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = profiler.as_mut() {
            p.before_launch(self)?;
        }
        self.launch_now(name, grid, block, smem, args)?;
        if let Some(p) = profiler.as_mut() {
            p.after_launch(self, name, work)?;
        }
        Ok(())
    }

    fn launch_now(&self, name: &str, grid: (u32, u32, u32), block: u32, smem: u32, args: &[Arg]) -> Result<()> {
        assert!(grid.0 > 0 && grid.1 > 0 && grid.2 > 0, "{name}: empty grid {grid:?}");
        let f = self.function(name)?;
        if smem > DEFAULT_DYNAMIC_SMEM {
            let mut allowed = self.smem_allowed.lock().unwrap_or_else(|e| e.into_inner());
            if allowed.get(name).is_none_or(|&a| a < smem) {
                use cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
                f.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32).with_context(|| {
                    format!("kernel {name} needs {smem} bytes of shared memory, more than {} allows", self.name)
                })?;
                allowed.insert(name.to_string(), smem);
            }
        }
        let mut builder = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Ptr(p) => builder.arg(&p.0),
                Arg::I32(x) => builder.arg(x),
                Arg::I64(x) => builder.arg(x),
                Arg::F32(x) => builder.arg(x),
                Arg::F64(x) => builder.arg(x),
            };
        }
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: smem };
        // Safety: every kernel's argument list is matched by its wrapper in ops.rs, and every
        // pointer comes from a live DeviceBuffer sized for the launch.
        let shape = || format!("kernel {name} (grid {grid:?}, block {block})");
        unsafe { builder.launch(cfg) }.with_context(|| format!("{} failed to launch", shape()))?;
        if self.sync_each_launch {
            self.stream.synchronize().with_context(|| format!("{} failed (FINCH_SYNC_EACH_LAUNCH)", shape()))?;
        }
        Ok(())
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().context("the GPU reported an error")
    }

    /// Copies host data to `dst`.
    pub fn upload<T: Copy>(&self, dst: DPtr, src: &[T]) -> Result<()> {
        unsafe { cudarc::driver::result::memcpy_htod_async(dst.0, src, self.stream.cu_stream()) }
            .context("copy to the GPU failed")?;
        // Pageable host memory: wait, so the caller may reuse `src` at once.
        self.synchronize()
    }

    /// Copies device data into `dst`.
    pub fn download<T: Copy>(&self, dst: &mut [T], src: DPtr) -> Result<()> {
        unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, src.0, self.stream.cu_stream()) }
            .context("copy from the GPU failed")?;
        self.synchronize()
    }

    /// Fills `bytes` bytes at `dst` with `byte` (0xFF poisons f32 and bf16 alike with NaN).
    pub fn fill_bytes(&self, dst: DPtr, byte: u8, bytes: usize) -> Result<()> {
        unsafe { cudarc::driver::result::memset_d8_async(dst.0, byte, bytes, self.stream.cu_stream()) }
            .context("memset on the GPU failed")
    }
}

/// Page-locked host memory: copies from and to it are truly asynchronous (and may be captured
/// into a graph), unlike copies from ordinary pageable memory.
pub struct PinnedBuffer {
    ptr: *mut u8,
    pub bytes: usize,
}

// SAFETY: the buffer is plain memory owned by this value; finch uses it from one thread at a time.
unsafe impl Send for PinnedBuffer {}
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    pub fn as_slice<T: bytemuck::Pod>(&self) -> &[T] {
        // SAFETY: `ptr` holds `bytes` bytes, page-aligned by cuMemHostAlloc, for the life of self.
        bytemuck::cast_slice(unsafe { std::slice::from_raw_parts(self.ptr, self.bytes) })
    }

    pub fn as_mut_slice<T: bytemuck::Pod>(&mut self) -> &mut [T] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        bytemuck::cast_slice_mut(unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) })
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from cuMemHostAlloc and is freed once; work on it has finished
        // (every step ends with a synchronisation).
        let _ = unsafe { cudarc::driver::result::free_host(self.ptr.cast()) };
    }
}

impl Gpu {
    /// `bytes` of page-locked host memory, zeroed (a multiple of 16, so any Pod view fits).
    pub fn alloc_pinned(&self, bytes: usize, what: &str) -> Result<PinnedBuffer> {
        let bytes = bytes.next_multiple_of(16).max(16);
        self.ctx.bind_to_thread().context("cannot use the CUDA context")?;
        // SAFETY: plain host allocation; the pointer is owned by the returned buffer.
        let ptr = unsafe { cudarc::driver::result::malloc_host(bytes, 0) }.with_context(|| {
            format!(
                "cannot allocate {} of page-locked host memory for {what}",
                crate::os::resources::human_bytes(bytes)
            )
        })?;
        let mut buf = PinnedBuffer { ptr: ptr.cast(), bytes };
        buf.as_mut_slice::<u8>().fill(0);
        Ok(buf)
    }

    /// Queues a copy of `bytes` from pinned `src` to `dst`; no wait.
    pub fn upload_async(&self, dst: DPtr, src: &PinnedBuffer, bytes: usize) -> Result<()> {
        unsafe {
            cudarc::driver::result::memcpy_htod_async(dst.0, &src.as_slice::<u8>()[..bytes], self.stream.cu_stream())
        }
        .context("copy to the GPU failed")
    }

    /// Queues a copy of `bytes` from `src` into pinned `dst`; no wait (synchronize before reading).
    /// `dst` is written behind the borrow checker's back, as the GPU writes it asynchronously
    /// anyway: read it only after a synchronisation.
    pub fn download_async(&self, dst: &PinnedBuffer, src: DPtr, bytes: usize) -> Result<()> {
        assert!(bytes <= dst.bytes, "download past the pinned buffer");
        // SAFETY: `dst.ptr` holds `dst.bytes` bytes; no Rust reference to them is alive across
        // the copy (callers read after synchronising).
        let out = unsafe { std::slice::from_raw_parts_mut(dst.ptr, bytes) };
        unsafe { cudarc::driver::result::memcpy_dtoh_async(out, src.0, self.stream.cu_stream()) }
            .context("copy from the GPU failed")
    }
}

impl DeviceBuffer {
    /// Keeps the allocation alive; the raw pointer `ptr` is what kernels receive.
    pub fn slice(&self) -> &CudaSlice<u8> {
        &self.slice
    }
}

/// "cuda" when a GPU and kernels are usable, with the reason when not.
pub fn availability() -> std::result::Result<Arc<Gpu>, String> {
    Gpu::open().map_err(|e| format!("{e:#}"))
}

/// The error of a PTX module the driver refused, in one line; a PTX ISA newer than the driver
/// knows (nvcc newer than the driver) names both versions.
fn ptx_load_error(e: cudarc::driver::DriverError, family: &str, ptx_text: &str, gpu: &str) -> anyhow::Error {
    use cudarc::driver::sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION;
    if e.0 != CUDA_ERROR_UNSUPPORTED_PTX_VERSION {
        return anyhow::anyhow!("cannot load the {family} kernels on {gpu}: {e}");
    }
    let mut version = 0;
    // SAFETY: cuDriverGetVersion writes one int; it is called only when the driver library loads
    // (cudarc would panic otherwise).
    let driver = match unsafe { cudarc::driver::sys::is_culib_present() } {
        true => match unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) } {
            cudarc::driver::sys::CUresult::CUDA_SUCCESS => format!("CUDA {}.{}", version / 1000, version % 1000 / 10),
            _ => "unknown".to_string(),
        },
        false => "unknown".to_string(),
    };
    anyhow::anyhow!(
        "the {family} kernels are PTX ISA {} from {}, newer than this NVIDIA driver ({driver}) accepts: update the \
         driver, or build finch with the nvcc of the driver's CUDA version",
        ptx::ptx_isa(ptx_text).unwrap_or("?"),
        ptx::NVCC.unwrap_or("an unknown nvcc")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use cudarc::driver::sys::CUresult;

    #[test]
    fn a_ptx_newer_than_the_driver_names_both_versions() {
        let e = cudarc::driver::DriverError(CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION);
        let message = ptx_load_error(e, "matmul", "//\n.version 9.9\n.target sm_80\n", "H100").to_string();
        assert!(message.starts_with("the matmul kernels are PTX ISA 9.9 from "), "{message}");
        assert!(message.contains("newer than this NVIDIA driver (") && message.contains("update the driver"));
    }
}
