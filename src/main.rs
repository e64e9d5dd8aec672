//! The `copilot-workers` binary: parse the command line, hand over to the library.

use clap::Parser as _;

/// mimalloc instead of glibc's allocator: the hot path allocates and frees many small
/// buffers across threads, where glibc's malloc took about a quarter of the worker's CPU
/// (see BENCHMARKS.md).
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = copilot_workers::cli::Cli::parse();
    copilot_workers::cli::main(cli)
}
