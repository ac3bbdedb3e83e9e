//! The `qemu-img` personality: what vdisk prints when it is run under that name and has to answer
//! before (or instead of) a subcommand — the top-level `--help` and `--version`, and usage
//! mistakes worded as qemu-img's getopt words them.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::error::{ContextKind, ContextValue, ErrorKind};

/// The qemu-img release whose interface vdisk follows.
pub const QEMU_VERSION: &str = "10.0.2";

/// The commands qemu-img has (and vdisk implements); vdisk's others (serve, boot ...) still work
/// under the qemu-img name but are not listed.
const QEMU_IMG_COMMANDS: &[&str] = &[
    "amend", "bench", "bitmap", "check", "commit", "compare", "convert", "create", "dd", "info",
    "map", "measure", "rebase", "resize", "snapshot",
];

/// Handles the arguments qemu-img reads before the command name. `None` means a command follows
/// and clap should parse the rest.
pub fn top_level(args: &[OsString], commands: &clap::Command) -> Option<ExitCode> {
    let first = args.get(1).map(|a| a.to_string_lossy().into_owned());
    match first.as_deref() {
        None => Some(usage_error("Not enough arguments", None)),
        Some("-h" | "--help" | "-?") => {
            print!("{}", help(commands));
            Some(ExitCode::SUCCESS)
        }
        Some("-V" | "--version") => {
            print!("{}", version());
            Some(ExitCode::SUCCESS)
        }
        Some(name) if !name.starts_with('-') && commands.find_subcommand(name).is_none() => {
            Some(usage_error(&format!("Command not found: {name}"), None))
        }
        _ => None,
    }
}

/// `qemu-img version 10.0.2 (vdisk 0.1.0)` and a second line saying what this really is.
pub fn version() -> String {
    format!(
        "qemu-img version {QEMU_VERSION} (vdisk {})\n\
         vdisk is a Rust reimplementation of the qemu-img command line; it contains no QEMU code\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// The top-level help, laid out as qemu-img's: usage, standard options, one line per command.
fn help(commands: &clap::Command) -> String {
    let mut out = version();
    out.push_str(
        "QEMU disk image utility.  Usage:\n\n  \
         qemu-img [standard options] COMMAND [--help | command options]\n\n\
         Standard options:\n  \
         -h, --help\n     display this help and exit\n  \
         -V, --version\n     display version info and exit\n\n\
         Recognized commands (run qemu-img COMMAND --help for command-specific help):\n\n",
    );
    let mut names: Vec<&clap::Command> = commands
        .get_subcommands()
        .filter(|c| QEMU_IMG_COMMANDS.contains(&c.get_name()))
        .collect();
    names.sort_by_key(|c| c.get_name());
    for c in names {
        let about = c.get_about().map(|a| a.to_string()).unwrap_or_default();
        out.push_str(&format!(
            "  {} - {}\n",
            c.get_name(),
            about.trim_end_matches('.')
        ));
    }
    out.push_str("\nSupported image formats:\n\n  luks qcow2 raw\n");
    out
}

/// `qemu-img: MESSAGE` and the `Try ... --help` hint; exit status 1.
fn usage_error(message: &str, command: Option<&str>) -> ExitCode {
    eprintln!("qemu-img: {message}");
    hint(command);
    ExitCode::from(1)
}

fn hint(command: Option<&str>) {
    match command {
        Some(c) => eprintln!("Try 'qemu-img {c} --help' for more info"),
        None => eprintln!("Try 'qemu-img --help' for more info"),
    }
}

/// Reports a command-line error found by clap the way qemu-img's getopt does
/// (`qemu-img convert: invalid option -- 'Z'`). Help and version requests print normally.
pub fn clap_error(err: &clap::Error, args: &[OsString]) -> ExitCode {
    if !err.use_stderr() {
        let _ = err.print();
        return ExitCode::SUCCESS;
    }
    let command = args
        .iter()
        .skip(1)
        .map(|a| a.to_string_lossy())
        .find(|a| !a.starts_with('-'))
        .map(|a| a.into_owned());
    let cmd = command.as_deref().unwrap_or("");
    let invalid = match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.clone(),
        _ => String::new(),
    };
    // clap names an argument as `--long <VALUE>` or `-s <VALUE>`; getopt wants the option as the
    // user spelled it, which for a missing value is the last argument.
    let mut option = invalid.split([' ', '=']).next().unwrap_or("").to_string();
    if matches!(err.kind(), ErrorKind::InvalidValue | ErrorKind::NoEquals) {
        if let Some(last) = args.last().map(|a| a.to_string_lossy()) {
            if last.starts_with('-') {
                option = last.into_owned();
            }
        }
    }
    match err.kind() {
        ErrorKind::UnknownArgument if option.starts_with("--") => {
            eprintln!("qemu-img {cmd}: unrecognized option '{invalid}'");
        }
        ErrorKind::UnknownArgument if option.starts_with('-') => {
            let letter = option.trim_start_matches('-');
            eprintln!("qemu-img {cmd}: invalid option -- '{letter}'");
        }
        ErrorKind::InvalidValue | ErrorKind::NoEquals if option.starts_with("--") => {
            eprintln!("qemu-img {cmd}: option '{option}' requires an argument");
        }
        ErrorKind::InvalidValue | ErrorKind::NoEquals if option.starts_with('-') => {
            let letter = option.trim_start_matches('-');
            eprintln!("qemu-img {cmd}: option requires an argument -- '{letter}'");
        }
        _ => {
            // Anything else: clap's own first line, without its `error: ` prefix.
            let text = err.render().to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("qemu-img: {}", line.trim_start_matches("error: "));
        }
    }
    hint(command.as_deref());
    ExitCode::from(1)
}
