//! `vdisk map`: where the data of an image lives, layer by layer, as `qemu-img map` prints it.

use anyhow::{anyhow, bail, Result};
use vdisk_formats::ExtentKind;

use crate::errors::{describe, UsageError};
use crate::image_args::{chain, HostFiles, ImageOpts, Output};
use crate::numbers::cvtnum;

/// Dump image metadata: the mapping of guest ranges to layers and host offsets.
///
/// Human output lists the ranges that hold data with their offset in the file that stores them;
/// JSON output describes every range: its backing-chain depth, whether it is present, reads as
/// zero, holds data or is compressed, and its host offset when it has one.
///
/// Examples:
///
///   vdisk map disk.qcow2
///
///   vdisk map --output=json overlay.qcow2
///
///   vdisk map --output=json --start-offset 1G --max-length 64M disk.qcow2
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    image: ImageOpts,

    /// Output format: human (the default) or json
    #[arg(long = "output", value_name = "human|json")]
    output: Option<String>,

    /// First guest byte to describe
    #[arg(
        long = "start-offset",
        value_name = "OFFSET",
        allow_hyphen_values = true
    )]
    start_offset: Option<String>,

    /// Describe at most this many bytes
    #[arg(long = "max-length", value_name = "LENGTH", allow_hyphen_values = true)]
    max_length: Option<String>,

    /// The image to describe
    #[arg(value_name = "FILENAME")]
    filename: Option<String>,

    /// More file names, refused with qemu-img's message
    #[arg(hide = true, allow_hyphen_values = true)]
    extra: Vec<String>,
}

/// One run of the map, as qemu's `MapEntry`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    start: u64,
    length: u64,
    depth: u32,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    offset: Option<u64>,
}

impl Entry {
    /// Whether `next` continues this run (qemu's `entry_mergeable`).
    fn mergeable(&self, next: &Entry) -> bool {
        self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }

    fn json(&self) -> String {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            self.start, self.length, self.depth, self.present, self.zero, self.data, self.compressed
        );
        if let Some(o) = self.offset {
            s.push_str(&format!(", \"offset\": {o}"));
        }
        s.push('}');
        s
    }
}

pub fn run(args: Args) -> Result<()> {
    crate::prog::die_on_sigpipe();
    let output = Output::parse(args.output.as_deref(), "map")?;
    let (Some(file), true) = (args.filename.as_deref(), args.extra.is_empty()) else {
        return Err(UsageError::error("map", "Expecting one image file name"));
    };
    let start = match args.start_offset.as_deref() {
        Some(t) => cvtnum("start offset", t)?,
        None => 0,
    };
    let max_length = match args.max_length.as_deref() {
        Some(t) => cvtnum("max length", t)?,
        None => i64::MAX as u64,
    };
    let image = args.image.image(file)?;
    let dev = image.open(true, false)?;
    let layers = chain(&image)?;
    let mut host_files = HostFiles::new(&layers);
    let end = dev.size().min(start.saturating_add(max_length));

    let mut entries: Vec<Entry> = Vec::new();
    let mut at = start;
    while at < end {
        let e = dev
            .extent(at, end - at)
            .map_err(|err| anyhow!("Could not read file metadata: {}", describe(&err)))?;
        // Data stored plainly may sit on holes of the host file: those read as zero.
        let (length, hole) = match (e.kind, e.host_offset) {
            (ExtentKind::Data, Some(host)) => host_files.run(e.depth, host, e.length)?,
            _ => (e.length, false),
        };
        let entry = Entry {
            start: at,
            length,
            depth: e.depth,
            // Unallocated in every layer (or past the end of a shorter backing file): reads as
            // zero, but nothing is there.
            present: e.kind != ExtentKind::Unallocated,
            zero: e.kind != ExtentKind::Data || hole,
            data: e.kind == ExtentKind::Data,
            compressed: e.compressed,
            offset: e.host_offset,
        };
        at += length;
        match entries.last_mut() {
            Some(last) if last.mergeable(&entry) => last.length += entry.length,
            _ => entries.push(entry),
        }
    }

    match output {
        Output::Json => {
            if entries.is_empty() {
                entries.push(Entry {
                    start,
                    length: 0,
                    depth: 0,
                    present: false,
                    zero: false,
                    data: false,
                    compressed: false,
                    offset: None,
                });
            }
            let lines: Vec<String> = entries.iter().map(Entry::json).collect();
            println!("[{}]", lines.join(",\n"));
        }
        Output::Human => {
            println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            for e in entries.iter().filter(|e| e.data) {
                let Some(offset) = e.offset else {
                    bail!("File contains external, encrypted or compressed clusters.");
                };
                // Clusters that read as zero (preallocated metadata over holes of the host
                // file) are not listed, as qemu-img leaves them out.
                if e.zero {
                    continue;
                }
                let name = layers
                    .get(e.depth as usize)
                    .map_or(String::new(), |l| l.path.display().to_string());
                println!(
                    "{:<16}{:<16}{:<16}{name}",
                    hex(e.start),
                    hex(e.length),
                    hex(offset)
                );
            }
        }
    }
    Ok(())
}

/// `%#x`: `0x1f`, and `0` for zero.
fn hex(n: u64) -> String {
    if n == 0 {
        "0".to_string()
    } else {
        format!("{n:#x}")
    }
}
