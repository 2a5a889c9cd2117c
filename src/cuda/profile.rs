//! `finch train --profile`: the GPU time of every kernel, from CUDA events recorded between
//! launches, with the work each launch does (FLOPs for the matmuls and attention, bytes moved
//! for the memory-bound kernels), summed per kernel; and MFU by llm.c's FLOP count against the
//! device's dense bf16 peak.
//!
//! An event is recorded before the first launch of a step and after every launch, so a kernel's
//! time is the gap between the events around it (gaps between launches count to the kernel that
//! follows them). Events recorded inside a CUDA graph capture cannot be timed afterwards, so a
//! profiled step is issued launch by launch (--profile turns --cuda-graph off).

use super::Gpu;
use crate::model::config::GptConfig;
use crate::model::layout::ParamLayout;
use anyhow::{Context, Result};
use cudarc::driver::{sys::CUevent_flags, CudaEvent};
use serde::Serialize;

/// What one launch computes: floating-point operations, and bytes read and written in device
/// memory (compulsory traffic: each input and output once).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Work {
    pub flops: f64,
    pub bytes: f64,
}

impl Work {
    pub fn flops(flops: f64) -> Work {
        Work { flops, bytes: 0.0 }
    }
    pub fn bytes(bytes: f64) -> Work {
        Work { flops: 0.0, bytes }
    }
}

/// One kernel's totals over the profiled steps.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KernelTotal {
    pub kernel: String,
    pub launches: u64,
    pub ms: f64,
    pub flops: f64,
    pub bytes: f64,
}

/// Events recorded on the GPU's stream between launches, and what the launches were.
#[derive(Default)]
pub struct Profiler {
    /// Reused from step to step; `events[0..=launches.len()]` are this step's.
    events: Vec<CudaEvent>,
    launches: Vec<(String, Work)>,
    /// Per kernel, in the order first seen.
    pub totals: Vec<KernelTotal>,
    /// Launches are timed only while this is on: during training steps, not validation.
    pub recording: bool,
}

impl Profiler {
    /// A profiler timing launches from now on.
    pub fn recording() -> Profiler {
        Profiler { recording: true, ..Profiler::default() }
    }

    fn event(&mut self, gpu: &Gpu, i: usize) -> Result<&CudaEvent> {
        while self.events.len() <= i {
            // Timing events (the default, None, disables timing).
            self.events
                .push(gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).context("cannot create a CUDA event")?);
        }
        Ok(&self.events[i])
    }

    /// Records the event before a launch (only before the step's first: the one after each
    /// launch is the next one's start).
    pub(super) fn before_launch(&mut self, gpu: &Gpu) -> Result<()> {
        if self.recording && self.launches.is_empty() {
            self.event(gpu, 0)?.record(&gpu.stream).context("cannot record a CUDA event")?;
        }
        Ok(())
    }

    pub(super) fn after_launch(&mut self, gpu: &Gpu, kernel: &str, work: Work) -> Result<()> {
        if !self.recording {
            return Ok(());
        }
        self.launches.push((kernel.to_string(), work));
        let i = self.launches.len();
        self.event(gpu, i)?.record(&gpu.stream).context("cannot record a CUDA event")
    }

    /// After the step's work has finished: adds each launch's time to its kernel's total.
    /// Returns the step's GPU time in ms.
    pub fn end_step(&mut self) -> Result<f64> {
        self.recording = false;
        let mut step_ms = 0.0;
        for (i, (kernel, work)) in std::mem::take(&mut self.launches).into_iter().enumerate() {
            let ms = self.events[i].elapsed_ms(&self.events[i + 1]).context("cannot time a kernel")? as f64;
            step_ms += ms;
            let at = match self.totals.iter().position(|t| t.kernel == kernel) {
                Some(at) => at,
                None => {
                    self.totals.push(KernelTotal { kernel, ..KernelTotal::default() });
                    self.totals.len() - 1
                }
            };
            let t = &mut self.totals[at];
            t.launches += 1;
            t.ms += ms;
            t.flops += work.flops;
            t.bytes += work.bytes;
        }
        Ok(step_ms)
    }

    /// Forgets the totals (the first step, which includes one-time costs, is not reported).
    pub fn reset(&mut self) {
        self.totals.clear();
    }
}

/// llm.c's FLOPs per token of a training step (forward and backward): 6 per parameter (the
/// padded vocabulary included, as llm.c counts) plus 6·L·C·T for attention.
pub fn flops_per_token(cfg: &GptConfig, t: usize) -> f64 {
    let n = ParamLayout::new(cfg).total as f64;
    6.0 * n + 6.0 * (cfg.n_layer * cfg.n_embd * t) as f64
}

/// The dense bf16 tensor-core peak of the GPU `name` names, in FLOP/s, and what it is; None for
/// a GPU this table lacks (no MFU is shown then). NVIDIA's datasheet numbers, without sparsity.
pub fn dense_bf16_peak(name: &str) -> Option<(f64, &'static str)> {
    const PEAKS: [(&str, f64, &str); 7] = [
        ("H100 PCIe", 756e12, "H100 PCIe dense bf16, 756 TFLOP/s"),
        ("H100 NVL", 835e12, "H100 NVL dense bf16, 835 TFLOP/s"),
        ("H100", 989e12, "H100 SXM dense bf16, 989 TFLOP/s"),
        ("H200", 989e12, "H200 dense bf16, 989 TFLOP/s"),
        ("H800", 989e12, "H800 SXM dense bf16, 989 TFLOP/s"),
        ("A100", 312e12, "A100 dense bf16, 312 TFLOP/s"),
        ("A800", 312e12, "A800 dense bf16, 312 TFLOP/s"),
    ];
    PEAKS.iter().find(|(key, ..)| name.contains(key)).map(|&(_, peak, what)| (peak, what))
}

/// Prints the profile table: per kernel, launches and ms per step, share of the step, and
/// TFLOP/s (compute-bound kernels) or GB/s (memory-bound ones).
pub fn print_table(totals: &[KernelTotal], steps: usize) {
    let total_ms: f64 = totals.iter().map(|t| t.ms).sum();
    let mut rows: Vec<&KernelTotal> = totals.iter().collect();
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    println!("profile: {} per step over {steps} steps", format_ms(total_ms / steps as f64));
    println!("{:<40} {:>9} {:>11} {:>7} {:>12}", "kernel", "launches", "ms/step", "share", "throughput");
    for t in rows {
        let (launches, ms) = (t.launches as f64 / steps as f64, t.ms / steps as f64);
        println!(
            "{:<40} {:>9} {:>11.3} {:>6.1}% {:>12}",
            t.kernel,
            if launches.fract() == 0.0 { format!("{launches}") } else { format!("{launches:.1}") },
            ms,
            100.0 * t.ms / total_ms.max(f64::MIN_POSITIVE),
            throughput(t)
        );
    }
}

fn format_ms(ms: f64) -> String {
    format!("{ms:.3} ms of GPU time")
}

/// "412.3 TFLOP/s" for kernels that count FLOPs, "2810 GB/s" for those that count bytes.
pub fn throughput(t: &KernelTotal) -> String {
    let seconds = t.ms / 1e3;
    if seconds <= 0.0 {
        return "-".into();
    }
    if t.flops > 0.0 {
        format!("{:.1} TFLOP/s", t.flops / seconds / 1e12)
    } else if t.bytes > 0.0 {
        format!("{:.0} GB/s", t.bytes / seconds / 1e9)
    } else {
        "-".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Preset;

    #[test]
    fn gpt2_flops_per_token_is_llmc_s() {
        // GPT-2 124M with the padded vocabulary: 124,475,904 parameters (llm.c's count), T=1024.
        let cfg = GptConfig::preset(Preset::Gpt2);
        assert_eq!(ParamLayout::new(&cfg).total, 124_475_904);
        assert_eq!(flops_per_token(&cfg, 1024), 6.0 * 124_475_904.0 + 6.0 * 12.0 * 768.0 * 1024.0);
    }

    #[test]
    fn peaks_are_named_by_the_gpu() {
        assert_eq!(dense_bf16_peak("NVIDIA H100 80GB HBM3").unwrap().0, 989e12);
        assert_eq!(dense_bf16_peak("NVIDIA H100 PCIe").unwrap().0, 756e12);
        assert_eq!(dense_bf16_peak("NVIDIA H200").unwrap().0, 989e12);
        assert_eq!(dense_bf16_peak("NVIDIA A100-SXM4-80GB").unwrap().0, 312e12);
        assert!(dense_bf16_peak("NVIDIA GeForce RTX 4090").is_none());
    }

    #[test]
    fn throughput_is_in_the_kernel_s_unit() {
        let t = |flops, bytes| KernelTotal { kernel: "k".into(), launches: 1, ms: 2.0, flops, bytes };
        assert_eq!(throughput(&t(2e12, 0.0)), "1000.0 TFLOP/s");
        assert_eq!(throughput(&t(0.0, 6e9)), "3000 GB/s");
        assert_eq!(throughput(&t(0.0, 0.0)), "-");
    }
}
