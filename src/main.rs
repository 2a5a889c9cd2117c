use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;

/// finch trains GPT-2-style transformers: a plain CPU reference engine now, hand-written CUDA
/// kernels checked against it.
#[derive(Parser)]
#[command(name = "finch", version, about, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a GPT-2 model on a token file
    Train(finch::train::TrainArgs),
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
            finch::train::run(args, &is_explicit)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes joined by ": ".
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
