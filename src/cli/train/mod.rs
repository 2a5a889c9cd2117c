//! `finch train`: the training loop, which reads top to bottom like llm.c's main: load; then each
//! step (batches, forward, backward, norm, update); then log, validate, checkpoint.
//!
//! Around it: the flags and their checks (`args`), the memory plan (`memory`), loading (`setup`),
//! what a run writes (`outputs`), the CPU-or-GPU model the loop drives (`engine`), the
//! learning-rate schedules (`schedule`), and the data-parallel job this process may be one rank
//! of (`job`). In a job every rank runs this same loop on its share of each batch; rank 0 alone
//! prints, logs and writes files.

mod args;
pub mod engine;
mod job;
mod memory;
mod outputs;
pub mod schedule;
mod setup;

pub use args::{check_saved_args, merge_resumed_args, TrainArgs};

use crate::cli::device::Device;
use crate::cpu::optimizer::{AdamW, AdamWConfig};
use crate::cuda::model::StepOutcome;
use crate::cuda::model::Votes;
use crate::cuda::nccl::Nccl;
use crate::cuda::profile::{self, flops_per_token};
use crate::dist::spawn::JobStatus;
use crate::dist::world::World;
use crate::formats::checkpoint::TrainState;
use crate::formats::tokens::{BatchWalker, TokenStream};
use crate::formats::trainlog::{human_duration, plural, Console, JsonlLog, StepRecord};
use crate::model::family::ModelConfig;
use crate::model::layout::ParamLayout;
use crate::model::rng::Rng;
use crate::os::files::check_free_space;
use crate::os::interrupt::{signal_name, Interrupted, StopOnSignal};
use anyhow::{bail, Context, Result};
use engine::{Engine, GpuOptions};
use outputs::{
    check_writable, final_outputs_are_current, mid_run, save_checkpoint, write_final_outputs, HEADER_ALLOWANCE,
};
use schedule::LrSchedule;
use setup::{out_flag, plan, prepare_run_dir, print_setup, save_args, Plan, ValSet};
use std::path::PathBuf;
use std::time::Instant;

/// Runs `finch train`. `is_explicit(id)` tells whether a flag was given on the command line.
pub fn run(cli: TrainArgs, is_explicit: &dyn Fn(&str) -> bool) -> Result<()> {
    // Load: the flags, the run directory, the device, the data and the initial weights.
    let mut args = match &cli.resume {
        Some(_) => merge_resumed_args(&cli, is_explicit)?,
        None => cli,
    };
    args::check_flags(&args, is_explicit)?;
    let world = match job::role(&args)? {
        job::Role::Launched(status) if status.0 == 0 => return Ok(()),
        job::Role::Launched(status) => return Err(status.into()),
        job::Role::Rank(world) => world,
    };
    let lead = world.rank == 0;
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("--threads: cannot start the thread pool")?;
    }
    // Rank 0 owns the run directory; the others only read it (--resume).
    let mut run_dir = if lead { prepare_run_dir(&args)? } else { None };
    // A token file that shrinks or fails mid-run stops it (see sigbus); say how to go on.
    crate::os::sigbus::set_advice(match &args.out {
        Some(dir) => format!("; restore it, then continue with --resume {}", dir.display()),
        None => "; restore it and start again".to_string(),
    });
    let (device, device_reason) = match world.is_single() {
        true => Device::choose(&args.device, args.precision)?,
        false => (Device::for_rank(&args.device, args.precision, world.local_rank, world.size)?, None),
    };
    let plan = plan(&args, device, device_reason, world.size)?;
    if let Some((_, state)) = plan.resumed.as_ref().filter(|(_, s)| s.step >= plan.steps) {
        return if lead { finish_finished_run(&args, &plan, state.step) } else { Ok(()) };
    }
    args.tokenizer = plan.tokenizer;
    args.tokenizer_dir = plan.tokenizer_dir.clone();
    args.steps = Some(plan.steps);
    let schedule_note = schedule_segment(&mut args, &plan);
    if lead {
        print_setup(&args, &plan, &world);
        if let Some(note) = schedule_note {
            println!("{note}");
        }
        save_args(&args)?;
    }
    let nccl = job::connect(&world, &plan.device, args.dist_timeout)?;
    let explicit: Vec<String> = explicit_flags(&args, is_explicit);
    let mut run = Run::start(&args, plan, &explicit, world, nccl)?;
    if let Some(dir) = &mut run_dir {
        dir.started();
    }
    let hp = AdamWConfig { beta1: args.beta1, beta2: args.beta2, eps: args.eps, weight_decay: args.weight_decay };

    while run.state.step < run.steps {
        let step = run.state.step + 1;
        let started = Instant::now();
        // Each step: forward and backward over its micro-batches, the gradient norm, the update
        // (applied only when the loss and the norm are finite).
        let lr = args.learning_rate(step, run.steps);
        let batches = run.next_batches();
        let votes = run.votes();
        let outcome = run.engine.step(&batches, (run.b, run.t), lr, &hp, args.grad_clip, votes)?;
        let StepOutcome { loss, grad_norm, applied: finite, .. } = outcome;
        if !finite {
            run.stop_or_skip(step, loss, grad_norm)?;
        }
        let seconds = started.elapsed().as_secs_f64();
        run.state.step = step;

        // Then log, validate and checkpoint.
        let val_loss = run.validate_if_due(step)?;
        let record = StepRecord {
            step,
            loss,
            grad_norm,
            lr,
            ms: seconds * 1e3,
            tok_per_s: run.tokens_per_step() as f64 / seconds,
            mfu: run
                .flops_per_step
                .zip(run.engine.peak())
                .map(|(flops, (peak, _))| flops / seconds / (peak * run.world.size as f64)),
            val_loss,
            skipped: !finite,
        };
        run.log_step(&record)?;
        run.checkpoint_if_due(step, &outcome)?;
        kill_for_test(&run.world, step);
    }
    run.finish()
}

/// FINCH_TEST_KILL_RANK_AT_STEP=R:S: rank R kills itself (SIGKILL) after step S, so that the
/// tests can show how a job ends when a rank dies. Nothing else reads it.
fn kill_for_test(world: &World, step: usize) {
    let Ok(spec) = std::env::var("FINCH_TEST_KILL_RANK_AT_STEP") else { return };
    if spec == format!("{}:{step}", world.rank) {
        // SAFETY: raise on this process.
        unsafe { libc::raise(libc::SIGKILL) };
    }
}

/// A resumed run at or past its last step: it errs if its outputs are all there (nothing left to
/// do), else (killed after its last checkpoint, before its outputs were complete) writes them.
fn finish_finished_run(args: &TrainArgs, plan: &Plan, step: usize) -> Result<()> {
    if step > plan.steps || final_outputs_are_current(args, &plan.config, &plan.params) {
        bail!("the run already completed {step} of {} steps; pass a larger --steps to continue it", plan.steps);
    }
    println!("the run completed its {step} steps before it was interrupted; writing its final outputs");
    write_final_outputs(args, &plan.config, &plan.params, plan.log_path.as_deref(), plan.config.real_params())
}

/// For a resumed run given a new --steps: with --new-schedule, a new learning-rate schedule over
/// the steps from here (warm-up and decay again); otherwise the line that says how the old one
/// stretches to the new last step.
fn schedule_segment(args: &mut TrainArgs, plan: &Plan) -> Option<String> {
    let (_, state) = plan.resumed.as_ref()?;
    let (from, to) = (state.step, plan.steps);
    let next = from + 1;
    if args.new_schedule {
        args.schedule_start = from;
        return Some(format!(
            "learning rate: a new {} schedule over steps {next}–{to}: {:.2e} at step {next}, {:.2e} at {to}",
            args.lr_schedule.name(),
            args.learning_rate(next, to),
            args.learning_rate(to, to)
        ));
    }
    let previous = args.previous_steps.filter(|&p| p != to && args.lr_schedule != LrSchedule::Constant)?;
    Some(format!(
        "learning rate: the {} schedule of steps 1–{previous} now stretches to step {to}: {:.2e} at step {next} \
         (it was {:.2e} at step {from}), {:.2e} at {to}; pass --new-schedule for a new warm-up and decay over \
         steps {next}–{to}",
        args.lr_schedule.name(),
        args.learning_rate(next, to),
        args.learning_rate(from, previous.max(from)),
        args.learning_rate(to, to)
    ))
}

/// The flags given on this command line, for the log's resume event.
fn explicit_flags(args: &TrainArgs, is_explicit: &dyn Fn(&str) -> bool) -> Vec<String> {
    let value = serde_json::to_value(args).unwrap_or_default();
    let mut flags: Vec<String> = value.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    flags.retain(|f| is_explicit(f) && f != "resume");
    flags
}

/// A run under way: what the loop reads and updates from one step to the next.
struct Run<'a> {
    args: &'a TrainArgs,
    cfg: ModelConfig,
    layout: ParamLayout,
    b: usize,
    t: usize,
    steps: usize,
    train: TokenStream,
    val: Option<ValSet>,
    log_path: Option<PathBuf>,
    engine: Engine,
    /// The step finished last, the data position and the RNG: what a checkpoint saves.
    state: TrainState,
    log: Option<JsonlLog>,
    console: Console,
    stop_on_signal: Option<StopOnSignal>,
    last_checkpoint: Option<usize>,
    /// Steps whose update --skip-nonfinite skipped.
    skipped: Vec<usize>,
    checkpoint_bytes: u64,
    /// The window buffer the data walker reads into.
    batch: Vec<u32>,
    /// When the run (this process) started, and when it last checkpointed, for --checkpoint-minutes.
    started: Instant,
    last_checkpoint_at: Instant,
    /// llm.c's FLOPs of one step, on a GPU (MFU).
    flops_per_step: Option<f64>,
    /// The last step's record and the last validation loss, for the summary.
    last: Option<StepRecord>,
    last_val: Option<f64>,
    /// This process's place in a data-parallel job (alone: rank 0 of 1).
    world: World,
}

impl<'a> Run<'a> {
    /// Builds the model on its device and opens the log, after checking the disk has room for
    /// what the run will write. A resumed run's log gets an event naming the flags given now.
    fn start(
        args: &'a TrainArgs,
        plan: Plan,
        explicit: &[String],
        world: World,
        nccl: Option<Nccl>,
    ) -> Result<Run<'a>> {
        let lead = world.rank == 0;
        let cfg = plan.config;
        let layout = cfg.layout();
        let (optimizer, state): (Option<AdamW<f32>>, TrainState) = match plan.resumed {
            Some((optimizer, state)) => (Some(optimizer), state),
            None => (None, TrainState { step: 0, walker: BatchWalker { position: 0 }, rng: Rng::new(args.seed) }),
        };
        // Fail now, not after hours of training, when the checkpoint and the model cannot fit.
        let checkpoint_bytes = 3 * 4 * layout.total as u64 + HEADER_ALLOWANCE;
        let model_bytes = 4 * cfg.real_params() as u64 + HEADER_ALLOWANCE;
        if let Some(dir) = args.out.as_ref().filter(|_| lead) {
            check_free_space(
                dir,
                out_flag(args),
                checkpoint_bytes + model_bytes,
                "the checkpoint and the final model",
            )?;
        }
        if let Some(dir) = args.save.as_ref().filter(|_| lead) {
            check_writable(dir, "--save")?;
            check_free_space(dir, "--save", model_bytes, "the model")?;
        }
        let last_checkpoint = (state.step > 0).then_some(state.step);
        let engine = Engine::new(&plan.device, cfg, plan.params, optimizer, GpuOptions::of(args), nccl)?;
        if state.step > 0 && lead {
            println!("resuming after step {} (data position {})", state.step, state.walker.position);
        }
        let mut log = match plan.log_path.as_ref().filter(|_| lead) {
            // A resumed run without a checkpoint (--restart) starts its log afresh.
            Some(path) if args.resume.is_some() && state.step > 0 => Some(JsonlLog::resume(path, state.step)?),
            Some(path) => {
                let mut log = JsonlLog::create(path)?;
                log.write(&serde_json::json!({
                    "event": "start", "config": cfg, "params": cfg.real_params(), "args": args,
                    "batch_size": plan.b, "seq_len": plan.t, "steps": plan.steps,
                }))?;
                Some(log)
            }
            None => None,
        };
        if let (Some(log), Some(_)) = (&mut log, &args.resume) {
            let given: serde_json::Map<String, serde_json::Value> = explicit
                .iter()
                .filter_map(|f| Some((f.clone(), serde_json::to_value(args).ok()?.get(f).cloned()?)))
                .collect();
            log.write(&serde_json::json!({
                "event": "resume", "at_step": state.step, "steps": plan.steps, "restart": args.restart,
                "new_schedule": args.new_schedule, "flags": given,
            }))?;
        }
        let skipped = log.as_ref().map(|l| l.skipped_before.clone()).unwrap_or_default();
        let console = match lead {
            true => Console::new(state.step, plan.steps, args.print_every),
            false => Console::Quiet,
        };
        // From here on Ctrl-C or SIGTERM finishes the step under way and checkpoints it (see
        // interrupt); before, there is nothing to save, and a signal stops the run at once.
        let stop_on_signal =
            args.out.as_deref().map(|dir| StopOnSignal::install(dir, last_checkpoint.is_some(), !lead));
        let tokens_per_step = plan.b * plan.t * args.grad_accum * world.size;
        let flops_per_step = engine.peak().map(|(_, peak)| {
            if lead {
                println!("MFU: llm.c's FLOP count (6·N + 6·L·C·T per token) against the {peak}");
            }
            flops_per_token(cfg.gpt().expect("only GpuGpt reports a peak"), plan.t) * tokens_per_step as f64
        });
        if args.profile && matches!(engine, Engine::Cpu { .. }) {
            println!("--profile: the run is on the CPU, where there are no kernels to time");
        }
        if (args.profile || args.recompute) && matches!(engine, Engine::GpuLlama(_)) && lead {
            println!("--profile and --recompute: not implemented for Llama-family models yet; training without them");
        }
        Ok(Run {
            args,
            cfg,
            layout,
            b: plan.b,
            t: plan.t,
            steps: plan.steps,
            train: plan.train,
            val: plan.val,
            log_path: plan.log_path,
            engine,
            state,
            log,
            console,
            stop_on_signal,
            last_checkpoint,
            skipped,
            checkpoint_bytes,
            batch: Vec::new(),
            started: Instant::now(),
            last_checkpoint_at: Instant::now(),
            flops_per_step,
            last: None,
            last_val: None,
            world,
        })
    }

    /// Tokens of one step, every rank's.
    fn tokens_per_step(&self) -> usize {
        self.b * self.t * self.args.grad_accum * self.world.size
    }

    fn lead(&self) -> bool {
        self.world.rank == 0
    }

    /// The step's micro-batches (inputs, targets), read in order from the training data: with
    /// several ranks, this rank's share of each (see BatchWalker::next_batch_of).
    fn next_batches(&mut self) -> Vec<(Vec<u32>, Vec<u32>)> {
        let window = self.b * self.t;
        let share = (self.world.rank, self.world.size);
        (0..self.args.grad_accum)
            .map(|_| {
                let (mut x, mut y) = (vec![0; window], vec![0; window]);
                self.state.walker.next_batch_of(&self.train, &mut self.batch, &mut x, &mut y, share);
                (x, y)
            })
            .collect()
    }

    /// What this rank asks of the step (a data-parallel job decides together): stop, after a
    /// signal; checkpoint, when --checkpoint-minutes have passed on its clock.
    fn votes(&self) -> Votes {
        Votes {
            stop: self.stop_on_signal.as_ref().and_then(StopOnSignal::requested).is_some(),
            checkpoint: self.checkpoint_timer_due(),
        }
    }

    fn checkpoint_timer_due(&self) -> bool {
        let minutes = self.args.checkpoint_minutes;
        minutes > 0.0 && self.last_checkpoint_at.elapsed().as_secs_f64() >= minutes * 60.0
    }

    /// A step whose loss or gradient norm is not finite: stop the run before its update, naming
    /// the first non-finite gradient, or with --skip-nonfinite skip the update and go on.
    fn stop_or_skip(&mut self, step: usize, loss: f64, grad_norm: f64) -> Result<()> {
        if !self.lead() {
            // The loss and norm are the job's: every rank decides the same; rank 0 says it.
            if !self.args.skip_nonfinite {
                return Err(JobStatus(1).into());
            }
            self.skipped.push(step);
            return Ok(());
        }
        let culprit = match self.engine.first_nonfinite_grad(&self.layout)? {
            Some(bad) => format!("first non-finite gradient: {bad}"),
            None => "every parameter gradient is finite".to_string(),
        };
        let what = format!("the loss is {loss} and the gradient norm is {grad_norm} ({culprit})");
        if !self.args.skip_nonfinite {
            self.console.finish();
            let kept = match (&self.args.out, self.last_checkpoint) {
                (Some(dir), Some(s)) => format!(" (the checkpoint of step {s} in {} is intact)", dir.display()),
                (Some(_), None) => " (no checkpoint had been written yet)".to_string(),
                (None, _) => String::new(),
            };
            bail!(
                "step {step}: {what}; stopped before applying its update{kept}; lower --lr, or pass \
                 --skip-nonfinite to skip such steps"
            );
        }
        // The data position has advanced; the weights and optimizer state have not.
        self.console.println(&format!("step {step}: {what}; skipped its update (--skip-nonfinite)"));
        self.skipped.push(step);
        Ok(())
    }

    /// The mean loss over the validation batches, every --val-every steps and after the last.
    fn validate_if_due(&mut self, step: usize) -> Result<Option<f64>> {
        let due = self.args.val_every > 0 && step % self.args.val_every == 0 || step == self.steps;
        match &self.val {
            Some(val) if due => {
                let share = (self.world.rank, self.world.size);
                let loss = mean_loss_over(&mut self.engine, &val.stream, (val.b, val.t), val.batches, share)?;
                self.last_val = Some(loss);
                Ok(Some(loss))
            }
            _ => Ok(None),
        }
    }

    fn log_step(&mut self, record: &StepRecord) -> Result<()> {
        self.console.step(record);
        self.last = Some(record.clone());
        if let Some(log) = &mut self.log {
            log.write(record).map_err(|e| mid_run(e, self.args.out.as_deref(), self.last_checkpoint))?;
        }
        Ok(())
    }

    /// Checkpoints every --checkpoint-every steps, when --checkpoint-minutes have passed since the
    /// last checkpoint (or the start), after the last step, and when Ctrl-C or SIGTERM asked the run
    /// to stop; in that last case returns `Interrupted` once the checkpoint is written.
    fn checkpoint_if_due(&mut self, step: usize, outcome: &StepOutcome) -> Result<()> {
        // Alone, this process's signal and clock; in a job, what the ranks voted in the step, so
        // that all checkpoint (the weights are gathered from every rank) and stop together.
        let local = self.stop_on_signal.as_ref().and_then(StopOnSignal::requested);
        let (stop, timely) = match self.world.is_single() {
            true => (local, self.checkpoint_timer_due()),
            false => ((outcome.stop_votes > 0).then(|| local.unwrap_or(libc::SIGTERM)), outcome.checkpoint_votes > 0),
        };
        let stop = stop.filter(|_| step < self.steps);
        let Some(dir) = &self.args.out else { return Ok(()) };
        let every = self.args.checkpoint_every;
        let due = every > 0 && step % every == 0 || timely || step == self.steps;
        if due || stop.is_some() {
            match self.lead() {
                true => save_checkpoint(
                    dir,
                    &self.engine,
                    &self.layout,
                    &self.cfg,
                    &self.state,
                    self.log.as_ref(),
                    self.checkpoint_bytes,
                )
                .map_err(|e| mid_run(e, Some(dir), self.last_checkpoint))?,
                // The others give rank 0 their shares of the weights and AdamW's state.
                false => self.engine.with_state(|_, _| Ok(()))?,
            }
            self.last_checkpoint = Some(step);
            self.last_checkpoint_at = Instant::now();
            if let Some(watch) = &self.stop_on_signal {
                watch.checkpoint_written();
            }
        }
        if let Some(signal) = stop {
            self.console.finish();
            return Err(Interrupted {
                signal,
                message: format!(
                    "stopped by {} after step {step} of {}; its checkpoint is in {}: continue with finch train \
                     --resume {2}",
                    signal_name(signal),
                    self.steps,
                    dir.display()
                ),
            }
            .into());
        }
        Ok(())
    }

    /// After the last step: the model, the plot and --save, what --skip-nonfinite skipped, and a
    /// summary with the commands to try next.
    fn finish(mut self) -> Result<()> {
        // A signal now lets the final outputs be written; a second one stops at once, and --resume
        // writes them from the last checkpoint.
        self.console.finish();
        if !self.lead() {
            // Rank 0 writes the outputs from the weights every rank gives it.
            return self.engine.with_state(|_, _| Ok(()));
        }
        self.report_profile()?;
        let real = self.cfg.real_params();
        self.engine.with_state(|params, _| {
            write_final_outputs(self.args, &self.cfg, params, self.log_path.as_deref(), real)
        })?;
        if !self.skipped.is_empty() {
            let mut list: Vec<String> = self.skipped.iter().take(10).map(|s| s.to_string()).collect();
            if self.skipped.len() > 10 {
                list.push("…".into());
            }
            println!(
                "skipped {} of {} updates whose loss or gradient norm was not finite (--skip-nonfinite): steps {}",
                self.skipped.len(),
                self.steps,
                list.join(", ")
            );
        }
        self.print_summary();
        Ok(())
    }

    /// --profile: the per-kernel table, and the same numbers as a "profile" event in the log.
    fn report_profile(&mut self) -> Result<()> {
        let Some((totals, steps)) = self.engine.profile() else {
            if self.args.profile && matches!(self.engine, Engine::Gpu(_)) {
                println!("--profile: a profile needs at least 2 steps in this run (the first is not timed)");
            }
            return Ok(());
        };
        profile::print_table(&totals, steps);
        let total_ms: f64 = totals.iter().map(|t| t.ms).sum();
        let peak = self.engine.peak();
        let mfu = self.flops_per_step.zip(peak).map(|(f, (p, _))| f / (total_ms / steps as f64 / 1e3) / p);
        if let Some(m) = mfu {
            println!("MFU over the profiled GPU time: {:.1}% of the {}", 100.0 * m, peak.expect("with mfu").1);
        }
        let kernels: Vec<serde_json::Value> = totals
            .iter()
            .map(|t| {
                let seconds = t.ms / 1e3;
                serde_json::json!({
                    "kernel": t.kernel,
                    "launches_per_step": t.launches as f64 / steps as f64,
                    "ms_per_step": t.ms / steps as f64,
                    "share": t.ms / total_ms.max(f64::MIN_POSITIVE),
                    "tflops": (t.flops > 0.0 && seconds > 0.0).then(|| t.flops / seconds / 1e12),
                    "gbps": (t.bytes > 0.0 && seconds > 0.0).then(|| t.bytes / seconds / 1e9),
                })
            })
            .collect();
        if let Some(log) = &mut self.log {
            log.write(&serde_json::json!({
                "event": "profile", "steps": steps, "gpu_ms_per_step": total_ms / steps as f64, "mfu": mfu,
                "peak": peak.map(|p| p.1), "kernels": kernels,
            }))?;
        }
        Ok(())
    }

    /// "done: …" with the time, tokens and final losses, then what to run next.
    fn print_summary(&self) {
        let Some(last) = &self.last else { return };
        let first = self.console.first_step();
        let steps = self.steps - first;
        let tokens = steps * self.tokens_per_step();
        let val = self.last_val.map(|v| format!(", val loss {v:.4}")).unwrap_or_default();
        println!(
            "done: {} in {} ({} tokens{}); final loss {:.4}{val}",
            plural(steps as u64, "step"),
            human_duration(self.started.elapsed().as_secs_f64()),
            tokens,
            if first > 0 { format!(", after resuming at step {first}") } else { String::new() },
            last.loss
        );
        let finch = crate::cli::finch_command();
        let model = match (&self.args.out, &self.args.save) {
            (Some(dir), _) => dir.display().to_string(),
            (None, Some(dir)) => dir.display().to_string(),
            (None, None) => return,
        };
        let prompt = match self.args.tokenizer {
            Some(_) => " --prompt 'Once upon a time'",
            None => "",
        };
        println!("next:\n  {finch} sample --model {model}{prompt}");
        if let Some(dir) = &self.args.out {
            println!("  {finch} plot {} --out loss.png", dir.display());
            println!("  {finch} train --resume {} --steps {}   # train longer", dir.display(), self.steps * 2);
        }
    }
}

fn mean_loss_over(
    engine: &mut Engine,
    stream: &TokenStream,
    (b, t): (usize, usize),
    batches: usize,
    (rank, ranks): (usize, usize),
) -> Result<f64> {
    // The same batches whatever the number of ranks: rank r evaluates those numbered r, r + ranks,
    // ...; the sums and counts are added across ranks.
    let mut walker = BatchWalker { position: 0 };
    let (mut buf, mut x, mut y) = (Vec::new(), vec![0; b * t], vec![0; b * t]);
    let (mut total, mut count) = (0.0, 0.0);
    for i in 0..batches {
        walker.next_batch(stream, &mut buf, &mut x, &mut y);
        if i % ranks == rank {
            total += engine.forward(&x, &y, b, t)?;
            count += 1.0;
        }
    }
    let summed = engine.sum_over_ranks(&[total, count])?;
    Ok(summed[0] / summed[1])
}
