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
    Quickstart(finch::quickstart::QuickstartArgs),
    /// Turn text (files, directories, JSONL, stdin) into token shards
    Tokenize(finch::tokenize::TokenizeArgs),
    /// Train a GPT-2 model on a token file
    Train(Box<finch::train::TrainArgs>),
    /// Generate text from a saved model
    Sample(finch::sample::SampleArgs),
    /// Plot loss curves from training logs to SVG or PNG
    Plot(finch::plot::PlotArgs),
    /// Benchmark GPU kernels against cuBLAS (needs a GPU)
    Bench(finch::cuda::bench::BenchArgs),
    /// Check every GPU kernel against the CPU reference on this machine
    Check(finch::cuda::check::CheckArgs),
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        Command::Train(args) => {
            let sub = matches.subcommand_matches("train").expect("train was parsed");
            let is_explicit = |id: &str| sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
            finch::train::run(*args, &is_explicit)
        }
        Command::Quickstart(args) => finch::quickstart::run(args),
        Command::Tokenize(args) => finch::tokenize::run(args),
        Command::Sample(args) => finch::sample::run(args),
        Command::Plot(args) => finch::plot::run(args),
        Command::Bench(args) => finch::cuda::bench::run(args),
        Command::Check(args) => finch::cuda::check::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<finch::interrupt::Interrupted>() {
            // Stopped by Ctrl-C or SIGTERM after saving its work: not an error, nor a finished run.
            Some(stop) => {
                eprintln!("{stop}");
                ExitCode::from(stop.exit_code())
            }
            None => {
                // One line: the error and its causes joined by ": ".
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
