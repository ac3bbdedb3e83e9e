//! `vdisk dd`: copy a range of an image into a new image, with dd-style operands.

use anyhow::{anyhow, Result};
use vdisk_formats::convert::is_zero;
use vdisk_formats::{CreateOptions, Format};

use crate::errors::describe;
use crate::image_args::ImageOpts;
use crate::numbers::cvtnum_in;

/// Largest read and write.
const CHUNK: u64 = 4 << 20;

/// Copy input to output with optional format conversion.
///
/// Operands: if=INPUT and of=OUTPUT (required); bs=BLOCK_SIZE (default 512, with an optional
/// suffix k, M, G ...); count=BLOCKS copies only that many blocks; skip=BLOCKS starts that many
/// blocks into the input. OUTPUT is created (replacing an existing file) in the format -O.
/// As in qemu-img, count limits the input before skip is applied.
///
/// Examples:
///
///   vdisk dd if=disk.qcow2 of=mbr.raw bs=512 count=1
///
///   vdisk dd -O qcow2 if=disk.raw of=tail.qcow2 bs=1M skip=1024
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    image: ImageOpts,

    /// Format of the output (default raw)
    #[arg(short = 'O', long = "output-format", value_name = "OUTPUT_FMT")]
    output_format: Option<String>,

    /// Operands: if=INPUT of=OUTPUT [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS]
    #[arg(value_name = "OPERAND", allow_hyphen_values = true)]
    operands: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    let (mut input, mut output) = (None, None);
    let (mut bs, mut count, mut skip) = (512u64, None, None);
    for op in &args.operands {
        let (key, value) = op.split_once('=').unwrap_or((op.as_str(), ""));
        match key {
            "if" => input = Some(value.to_string()),
            "of" => output = Some(value.to_string()),
            "bs" => bs = cvtnum_in("bs", value, 1, i32::MAX as u64)?,
            "count" => count = Some(cvtnum_in("count", value, 0, i64::MAX as u64)?),
            "skip" => skip = Some(cvtnum_in("skip", value, 0, i64::MAX as u64)?),
            _ => return Err(anyhow!("unrecognized operand {key}")),
        }
    }
    let (Some(input), Some(output)) = (input, output) else {
        return Err(anyhow!("Must specify both input and output files"));
    };
    let out_format = match args.output_format.as_deref() {
        None => Format::Raw,
        Some(name) => Format::from_name(name).map_err(|_| anyhow!("Unknown file format"))?,
    };
    let image = args.image.image(&input)?;
    let src = image.open(true, false)?;

    let mut end = src.size();
    if let Some(c) = count {
        if let Some(n) = c.checked_mul(bs) {
            end = end.min(n);
        }
    }
    let start = match skip {
        Some(s) => match s.checked_mul(bs).filter(|&n| n <= end) {
            Some(n) => n,
            None => {
                eprintln!(
                    "{}: {}: cannot skip to specified offset",
                    crate::prog::name(),
                    image.display
                );
                end
            }
        },
        None => 0,
    };

    let opts = CreateOptions::from_pairs(out_format, Some(end - start), &[]).map_err(|e| {
        anyhow!(
            "{output}: error while creating output image: {}",
            describe(&e)
        )
    })?;
    vdisk_formats::create(output.as_ref(), &opts).map_err(|e| {
        anyhow!(
            "{output}: error while creating output image: {}",
            describe(&e)
        )
    })?;
    let dst =
        crate::image_args::ImageRef::file(&output, Some(out_format.name())).open(false, true)?;

    let chunk = CHUNK.max(bs) / bs * bs;
    let mut buf = vec![0u8; chunk.min(end - start) as usize];
    let mut at = start;
    while at < end {
        let n = chunk.min(end - at) as usize;
        src.read_at(&mut buf[..n], at).map_err(|e| {
            anyhow!(
                "error while reading from input image file: {}",
                describe(&e)
            )
        })?;
        // The new image reads as zero already.
        if !is_zero(&buf[..n]) {
            dst.write_at(&buf[..n], at - start).map_err(|e| {
                anyhow!("error while writing to output image file: {}", describe(&e))
            })?;
        }
        at += n as u64;
    }
    dst.flush().map_err(|e| anyhow!(describe(&e)))
}
