//! The `finetune` binary: parses the command line and hands over to the library.
use clap::Parser;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = finetune::cli::Cli::parse();
    match finetune::execute(cli) {
        Ok(outcome) => outcome.exit_code(),
        Err(e) => {
            eprintln!("finetune: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
