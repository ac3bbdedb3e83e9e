//! `vdisk`: qemu-img compatible disk image tools.
//!
//! This binary only parses the command line and prints; the image work is done by
//! `vdisk_formats`. Errors print as `vdisk: <message>` and exit with status 1, as qemu-img's do.

mod cmd;
mod errors;
mod numbers;
mod options;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Virtual disk image tools, a drop-in replacement for qemu-img.
#[derive(Parser)]
#[command(name = "vdisk", version, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Create(cmd::create::Args),
    Info(cmd::info::Args),
    Bench(cmd::bench::Args),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Help and version go to stdout and succeed; usage mistakes exit 1 like qemu-img's.
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.command {
        Command::Create(args) => cmd::create::run(args),
        Command::Info(args) => cmd::info::run(args),
        Command::Bench(args) => cmd::bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vdisk: {e:#}");
            if let Some(usage) = e.downcast_ref::<errors::UsageError>() {
                eprintln!("Try 'vdisk {} --help' for more info", usage.command);
            }
            ExitCode::from(1)
        }
    }
}
