//! The `finch` binary: parses the command line (clap), runs the subcommand from `finch::cli`, and
//! turns an error into one line and a non-zero exit.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;

/// finch trains GPT-2-style transformers on its own CUDA kernels, each checked against a plain
/// CPU reference engine.
#[derive(Parser)]
#[command(name = "finch", version, about, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Zero setup: generate a small corpus, train a small GPT on it and sample from it
    Quickstart(finch::cli::quickstart::QuickstartArgs),
    /// Turn text (files, directories, JSONL, stdin) into token shards
    Tokenize(finch::cli::tokenize::TokenizeArgs),
    /// Train a GPT-2 model on a token file
    Train(Box<finch::cli::train::TrainArgs>),
    /// Generate text from a saved model
    Sample(finch::cli::sample::SampleArgs),
    /// Plot loss curves from training logs to SVG or PNG
    Plot(finch::cli::plot::PlotArgs),
    /// Benchmark GPU kernels against cuBLAS (needs a GPU)
    Bench(finch::cli::bench::BenchArgs),
    /// Check every GPU kernel against the CPU reference on this machine
    Check(finch::cli::check::CheckArgs),
}

fn main() -> ExitCode {
    // Output piped into a program that stops reading (`finch train | head`) ends finch quietly, as
    // it does cat or grep, instead of a panic in println.
    // SAFETY: signal(2) with the default action, before any thread is started.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        Command::Train(args) => {
            let sub = matches.subcommand_matches("train").expect("train was parsed");
            // Only ids clap knows can be asked about (value_source panics on others).
            let is_explicit = |id: &str| {
                sub.ids().any(|i| i.as_str() == id)
                    && sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
            };
            finch::cli::train::run(*args, &is_explicit)
        }
        Command::Quickstart(args) => finch::cli::quickstart::run(args),
        Command::Tokenize(args) => finch::cli::tokenize::run(args),
        Command::Sample(args) => finch::cli::sample::run(args),
        Command::Plot(args) => finch::cli::plot::run(args),
        Command::Bench(args) => finch::cli::bench::run(args),
        Command::Check(args) => finch::cli::check::run(args),
    };
    // A rank of a multi-process job names itself in what it prints.
    let rank = finch::dist::world::current().filter(|w| !w.is_single()).map(|w| w.describe());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(status) = e.downcast_ref::<finch::dist::spawn::JobStatus>() {
                // The ranks have said what happened; the launcher only passes their status on.
                return ExitCode::from(status.0.clamp(0, 255) as u8);
            }
            match e.downcast_ref::<finch::os::interrupt::Interrupted>() {
                // Stopped by Ctrl-C or SIGTERM after saving its work: not an error, nor a finished run.
                Some(stop) => {
                    if rank.is_none() || finch::dist::world::current().is_some_and(|w| w.rank == 0) {
                        eprintln!("{stop}");
                    }
                    ExitCode::from(stop.exit_code())
                }
                None => {
                    // One line: the error and its causes joined by ": ".
                    let text = format!("{e:#}");
                    match rank {
                        Some(who) if !text.starts_with("rank ") => eprintln!("error: {who}: {text}"),
                        _ => eprintln!("error: {text}"),
                    }
                    ExitCode::FAILURE
                }
            }
        }
    }
}
