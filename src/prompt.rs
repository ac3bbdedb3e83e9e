//! Asking for the passphrase of an encrypted image on the terminal.
//!
//! Under its own name, when no secret names the passphrase and standard input is a terminal,
//! vdisk asks for it with echo turned off (as cryptsetup does). Run as `qemu-img` it never asks:
//! qemu-img fails with "Parameter 'key-secret' is required for cipher", and scripts rely on that.

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use vdisk_formats::{Format, Passphrase};

use crate::prog::{personality, Personality};

/// Whether vdisk may ask on the terminal: under its own name, with standard input a terminal.
pub fn can_ask() -> bool {
    // SAFETY: isatty only inspects the descriptor number; any value is safe to pass.
    personality() == Personality::Vdisk && unsafe { libc::isatty(libc::STDIN_FILENO) } == 1
}

/// Asks for the passphrase of `path` when it is an encrypted image and [`can_ask`]; `None` when
/// it is not encrypted (or cannot be read: opening it will say why) or nobody can be asked.
pub fn passphrase_for(
    path: &Path,
    format: Option<&str>,
    shown: &str,
) -> Result<Option<Passphrase>> {
    if !can_ask() {
        return Ok(None);
    }
    let format = format.and_then(|f| Format::from_name(f).ok());
    let encrypted =
        vdisk_formats::describe(path, format).is_ok_and(|info| info.encrypted == Some(true));
    if !encrypted {
        return Ok(None);
    }
    read_hidden(&format!("Enter passphrase for '{shown}': ")).map(Some)
}

/// Prints `prompt` on stderr and reads one line from the terminal on stdin with echo off (the
/// terminal's settings are restored whatever happens). The line ending is not part of it.
fn read_hidden(prompt: &str) -> Result<Passphrase> {
    let fd = libc::STDIN_FILENO;
    // SAFETY: termios is plain old data that tcgetattr fills in; the pointer is valid for the
    // call.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: as above; tcgetattr writes only into `saved`.
    if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot read the terminal settings");
    }
    let mut quiet = saved;
    quiet.c_lflag &= !(libc::ECHO | libc::ECHONL);
    // Echo goes off before the prompt shows, so nothing typed after it is ever echoed.
    // SAFETY: `quiet` is a valid termios copied from the terminal's own settings.
    if unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, &quiet) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot turn off terminal echo");
    }
    let mut stderr = std::io::stderr();
    let _ = write!(stderr, "{prompt}");
    let _ = stderr.flush();
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    // SAFETY: restores the settings read above on the same descriptor.
    unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, &saved) };
    let _ = writeln!(stderr);
    let n = read.context("cannot read the passphrase")?;
    if n == 0 {
        bail!("no passphrase was given (end of input)");
    }
    let text = line.strip_suffix('\n').unwrap_or(&line);
    let text = text.strip_suffix('\r').unwrap_or(text);
    Ok(Passphrase::new(text.as_bytes().to_vec()))
}
