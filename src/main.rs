//! `vdisk`: qemu-img compatible disk image tools.
//!
//! This binary only parses the command line and prints; the image work is done by
//! `vdisk_formats`. Errors print as `vdisk: <message>` and exit with status 1, as qemu-img's do
//! (commands with other statuses, like `compare` and `check`, return an [`errors::Exit`]).
//! Run as `qemu-img` (a link to this binary), it answers as qemu-img (see `prog.rs`).

mod backing_policy;
mod cmd;
mod daemon;
mod errors;
mod export;
mod image_args;
mod mounts;
mod nbd_list;
mod numbers;
mod objects;
mod options;
mod output;
mod prog;
mod progress;
mod prompt;
mod qemu_img;
mod tuned;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Virtual disk image tools, a drop-in replacement for qemu-img.
#[derive(Parser)]
#[command(name = "vdisk", version, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,

    #[command(flatten)]
    global: GlobalArgs,
}

/// `vdisk boot ...` parsed on its own: building the definitions of every command touches code
/// and data pages that would stay resident beside the guest for the life of the VM.
#[derive(Parser)]
#[command(name = "vdisk", version, args_override_self = true)]
struct BootCli {
    #[command(subcommand)]
    command: BootCommand,

    #[command(flatten)]
    global: GlobalArgs,
}

#[derive(Subcommand)]
enum BootCommand {
    Boot(cmd::boot::Args),
}

/// Options every command takes.
#[derive(clap::Args)]
struct GlobalArgs {
    /// Which backing files and external data files named inside an image vdisk may open:
    /// follow (all, as qemu-img), require-format (only backing files whose format the image
    /// records) or refuse (none); default $VDISK_BACKING_POLICY, else follow
    #[arg(
        long,
        global = true,
        value_name = "POLICY",
        value_parser = ["follow", "require-format", "refuse"]
    )]
    backing_policy: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    Create(cmd::create::Args),
    Info(cmd::info::Args),
    Bench(cmd::bench::Args),
    Serve(Box<cmd::serve::Args>),
    Connect(cmd::connect::Args),
    Disconnect(cmd::disconnect::Args),
    Mount(cmd::mount::Args),
    Umount(cmd::umount::Args),
    Boot(cmd::boot::Args),
    Convert(cmd::convert::Args),
    Map(cmd::map::Args),
    Compare(cmd::compare::Args),
    Check(cmd::check::Args),
    Snapshot(cmd::snapshot::Args),
    Resize(cmd::resize::Args),
    Measure(cmd::measure::Args),
    Dd(cmd::dd::Args),
    Commit(cmd::commit::Args),
    Rebase(cmd::rebase::Args),
    Amend(cmd::amend::Args),
    Bitmap(cmd::bitmap::Args),
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let argv0 = args
        .first()
        .map_or(std::ffi::OsStr::new("vdisk"), |a| a.as_os_str());
    let personality = prog::personality_of(argv0);
    prog::set(personality);
    if personality == prog::Personality::QemuNbd {
        if let Err(e) = backing_policy::init(None) {
            eprintln!("{}: {e:#}", prog::name());
            return ExitCode::from(1);
        }
        return cmd::qemu_nbd::main();
    }
    if personality == prog::Personality::Vdisk && args.get(1).is_some_and(|a| a == "boot") {
        return match BootCli::try_parse_from(&args) {
            Ok(BootCli {
                command: BootCommand::Boot(boot),
                global,
            }) => finish(&global, || cmd::boot::run(boot)),
            Err(e) => clap_exit(&e),
        };
    }
    let mut command = Cli::command();
    if personality == prog::Personality::QemuImg {
        // qemu-img has no such option: scripts set VDISK_BACKING_POLICY instead.
        command = command
            .name("qemu-img")
            .bin_name("qemu-img")
            .mut_arg("backing_policy", |a| a.hide(true));
        if let Some(code) = qemu_img::top_level(&args, &command) {
            return code;
        }
    }
    let parsed = command
        .try_get_matches_from(&args)
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) if personality == prog::Personality::QemuImg => {
            return qemu_img::clap_error(&e, &args)
        }
        Err(e) => return clap_exit(&e),
    };
    finish(&cli.global, || match cli.command {
        Command::Create(args) => cmd::create::run(args),
        Command::Info(args) => cmd::info::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Serve(args) => cmd::serve::run(*args),
        Command::Connect(args) => cmd::connect::run(args),
        Command::Disconnect(args) => cmd::disconnect::run(args),
        Command::Mount(args) => cmd::mount::run(args),
        Command::Umount(args) => cmd::umount::run(args),
        Command::Boot(args) => cmd::boot::run(args),
        Command::Convert(args) => cmd::convert::run(args),
        Command::Map(args) => cmd::map::run(args),
        Command::Compare(args) => cmd::compare::run(args),
        Command::Check(args) => cmd::check::run(args),
        Command::Snapshot(args) => cmd::snapshot::run(args),
        Command::Resize(args) => cmd::resize::run(args),
        Command::Measure(args) => cmd::measure::run(args),
        Command::Dd(args) => cmd::dd::run(args),
        Command::Commit(args) => cmd::commit::run(args),
        Command::Rebase(args) => cmd::rebase::run(args),
        Command::Amend(args) => cmd::amend::run(args),
        Command::Bitmap(args) => cmd::bitmap::run(args),
    })
}

/// Prints a command-line parse error (or the help or version it carries) and exits as qemu-img:
/// help and version go to stdout and succeed, usage mistakes exit 1.
fn clap_exit(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    if e.use_stderr() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Applies the global options, runs the command and turns its outcome into the exit status.
fn finish(global: &GlobalArgs, run: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
    if let Err(e) = backing_policy::init(global.backing_policy.as_deref()) {
        eprintln!("{}: {e:#}", prog::name());
        return ExitCode::from(1);
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let prog = prog::name();
            if let Some(exit) = e.downcast_ref::<errors::Exit>() {
                if let Some(message) = &exit.message {
                    eprintln!("{prog}: {message}");
                    if prog::personality() == prog::Personality::Vdisk {
                        if let Some(hint) = errors::hint(message) {
                            eprintln!("hint: {hint}");
                        }
                    }
                }
                return ExitCode::from(exit.code);
            }
            eprintln!("{prog}: {e:#}");
            if prog::personality() == prog::Personality::Vdisk {
                if let Some(hint) = errors::hint(&format!("{e:#}")) {
                    eprintln!("hint: {hint}");
                }
            }
            if let Some(usage) = e.downcast_ref::<errors::UsageError>() {
                eprintln!("Try '{prog} {} --help' for more info", usage.command);
            }
            ExitCode::from(1)
        }
    }
}
