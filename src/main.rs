//! The `copilot-workers` binary: parse the command line, hand over to the library.

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = copilot_workers::cli::Cli::parse();
    copilot_workers::cli::main(cli)
}
