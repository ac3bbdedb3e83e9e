//! `vdisk measure`: how large a file a new image (of a given size, or converted from an image)
//! needs, computed as qemu-img computes it.

use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};
use vdisk_formats::image::{create_options_help, OptionDesc};
use vdisk_formats::luks::measure;
use vdisk_formats::{BlockDev, ExtentKind, Format, FormatSpecific};

use crate::errors::{describe, UsageError};
use crate::image_args::{chain, parse_target_format, HostFiles, ImageOpts, Output, SnapshotCopy};
use crate::numbers::cvtnum;
use crate::objects::Objects;
use crate::options::{self, Typed};
use crate::output::qemu_json;

/// Calculate the file size required for a new image.
///
/// Prints the size the file needs right after `convert` (required) and when every cluster is
/// written (fully allocated), for an image of --size SIZE or one converted from FILENAME, in the
/// format -O with the options -o.
///
/// Examples:
///
///   vdisk measure -O qcow2 --size 100G
///
///   vdisk measure -O qcow2 -o cluster_size=2M --output=json disk.raw
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    image: ImageOpts,

    /// Format of the new image (default raw)
    #[arg(short = 'O', long = "target-format", value_name = "OUTPUT_FMT")]
    target_format: Option<String>,

    /// Options of the new image, as in `create -o`
    #[arg(short = 'o', long = "target-options", value_name = "OPTIONS")]
    options: Vec<String>,

    /// Measure a new image of this virtual size
    #[arg(
        short = 's',
        long = "size",
        value_name = "SIZE",
        allow_hyphen_values = true
    )]
    size: Option<String>,

    /// Output format: human (the default) or json
    #[arg(long = "output", value_name = "human|json")]
    output: Option<String>,

    /// Measure an internal snapshot of FILENAME (snapshot.id=ID, snapshot.name=NAME, or either)
    #[arg(short = 'l', long = "snapshot", value_name = "SNAPSHOT")]
    snapshot: Option<String>,

    /// The image to measure a conversion of
    #[arg(value_name = "FILENAME")]
    filename: Option<String>,

    /// More file names, refused with qemu-img's message
    #[arg(hide = true, allow_hyphen_values = true)]
    extra: Vec<String>,
}

/// The qcow2 layout options that change the metadata size.
struct Qcow2Layout {
    cluster_size: u64,
    refcount_bits: u64,
    extended_l2: bool,
    version: u32,
    full_prealloc: bool,
    has_backing: bool,
    /// Bytes of the LUKS header of `encrypt.format=luks` (0 without), stored in whole clusters.
    luks_header: u64,
}

/// What qemu-img's measure takes for LUKS beyond vdisk's create options: the file protocol's
/// preallocation (ignored) and `detached-header` (refused as QEMU refuses it).
const LUKS_MEASURE_ONLY: [OptionDesc; 2] = [
    OptionDesc {
        name: "preallocation",
        kind: "str",
        help: "Preallocation mode of the file",
    },
    OptionDesc {
        name: "detached-header",
        kind: "bool (on/off)",
        help: "Create a detached LUKS header",
    },
];

pub fn run(args: Args) -> Result<()> {
    let output = Output::parse(args.output.as_deref(), "measure")?;
    if !args.extra.is_empty() {
        return Err(UsageError::error(
            "measure",
            "Expecting one image file name",
        ));
    }
    let target = parse_target_format(args.target_format.as_deref().unwrap_or("raw"))?;
    let list = options::parse_lists(&args.options)?;
    let mut known = create_options_help(target).to_vec();
    if target == Format::Luks {
        known.extend(LUKS_MEASURE_ONLY);
    }
    let checked = options::check_types(&list.pairs, &known).map_err(|e| {
        eprintln!("{}: {e:#}", crate::prog::name());
        anyhow!("Invalid options for file format '{target}'")
    })?;
    let opt = |name: &str| checked.iter().find(|o| o.name == name);
    let mut snapshot_copy: Option<SnapshotCopy> = None;
    let source: Option<std::sync::Arc<dyn BlockDev>> = match (&args.size, &args.filename) {
        (Some(_), Some(_)) => bail!("--size N cannot be used together with a filename."),
        (None, None) => bail!("Either --size N or one filename must be specified."),
        (Some(_), None) => None,
        (None, Some(file)) => {
            let image = args.image.image(file)?;
            match &args.snapshot {
                Some(spec) => {
                    let copy = SnapshotCopy::new(&image, spec)?;
                    let dev = copy.image.open(true, false)?;
                    snapshot_copy = Some(copy);
                    Some(dev)
                }
                None => Some(image.open(true, false)?),
            }
        }
    };
    let virtual_size = match (&args.size, &source) {
        (Some(text), _) => cvtnum("image size", text)?,
        (None, Some(dev)) => dev.size(),
        (None, None) => unreachable!("one of them is given"),
    };

    let objects = Objects::parse(&args.image.object)?;
    let mut lookup = |id: &str| objects.secret(id).map(|_| ()).map_err(|e| e.to_string());
    let (required, fully, bitmaps) = match target {
        Format::Raw => (virtual_size, virtual_size, None),
        Format::Qcow2 => {
            let number = |name: &str, default: u64| match opt(name).map(|o| &o.typed) {
                Some(Typed::Number(n)) => *n,
                _ => default,
            };
            let mut layout = Qcow2Layout {
                cluster_size: number("cluster_size", 65536),
                refcount_bits: number("refcount_bits", 16),
                extended_l2: opt("extended_l2").is_some_and(|o| o.typed == Typed::Bool(true)),
                version: match opt("compat").map(|o| o.text.as_str()) {
                    Some("0.10" | "v2") => 2,
                    _ => 3,
                },
                full_prealloc: opt("preallocation")
                    .is_some_and(|o| o.text == "full" || o.text == "falloc"),
                has_backing: opt("backing_file").is_some(),
                luks_header: 0,
            };
            if opt("encrypt.format").is_some_and(|o| o.text == "luks") {
                let encrypt: Vec<(String, String)> = checked
                    .iter()
                    .filter_map(|o| Some((o.name.strip_prefix("encrypt.")?.into(), o.text.clone())))
                    .collect();
                layout.luks_header = measure::header_size(&encrypt, "encrypt.", &mut lookup)
                    .map_err(|e| anyhow!(describe(&e)))?;
            }
            let host_files = match (&args.filename, &snapshot_copy, &source) {
                (_, Some(copy), Some(_)) => Some(HostFiles::new(&chain(&copy.image)?)),
                (Some(file), None, Some(_)) => {
                    Some(HostFiles::new(&chain(&args.image.image(file)?)?))
                }
                _ => None,
            };
            let (required, fully) =
                measure_qcow2(&layout, virtual_size, source.as_ref(), host_files)?;
            let source_has_bitmaps = match &source {
                Some(dev) => matches!(
                    dev.info().map_err(|e| anyhow!(describe(&e)))?.format_specific,
                    Some(FormatSpecific::Qcow2(ref q)) if q.compat == "1.1"
                ),
                None => false,
            };
            let bitmaps = (layout.version >= 3 && source_has_bitmaps).then_some(0);
            (required, fully, bitmaps)
        }
        Format::Luks => {
            // QEMU's block_crypto_measure: every sector of the payload is written (encrypted), so
            // required and fully allocated are the same.
            let pairs: Vec<(String, String)> = checked
                .iter()
                .map(|o| (o.name.clone(), o.text.clone()))
                .collect();
            let header =
                measure::header_size(&pairs, "", &mut lookup).map_err(|e| anyhow!(describe(&e)))?;
            (header + virtual_size, header + virtual_size, None)
        }
    };

    match output {
        Output::Human => {
            println!("required size: {required}");
            println!("fully allocated size: {fully}");
            if let Some(b) = bitmaps {
                println!("bitmaps size: {b}");
            }
        }
        Output::Json => {
            let mut m = Map::new();
            if let Some(b) = bitmaps {
                m.insert("bitmaps".into(), Value::from(b));
            }
            m.insert("required".into(), Value::from(required));
            m.insert("fully-allocated".into(), Value::from(fully));
            println!("{}", qemu_json(&Value::Object(m)));
        }
    }
    Ok(())
}

/// (required, fully allocated) bytes of a qcow2 image, as QEMU's `qcow2_measure` counts them.
fn measure_qcow2(
    layout: &Qcow2Layout,
    size: u64,
    source: Option<&std::sync::Arc<dyn BlockDev>>,
    mut host_files: Option<HostFiles>,
) -> Result<(u64, u64)> {
    let cs = layout.cluster_size;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        bail!("Cluster size must be a power of two between 512 and 2048k");
    }
    let l2_entry = if layout.extended_l2 { 16 } else { 8 };
    let virtual_size = size.next_multiple_of(cs);
    let l2_tables = (virtual_size / cs).div_ceil(cs / l2_entry);
    if l2_tables * 8 > 32 << 20 {
        bail!("The image size is too large (try using a larger cluster size)");
    }
    let mut data = 0u64;
    if let Some(dev) = source {
        if layout.has_backing {
            data = virtual_size;
        } else {
            let ssize = dev.size();
            let mut off = 0;
            while off < ssize {
                let e = dev
                    .extent(off, ssize - off)
                    .map_err(|e| anyhow!(describe(&e)))?;
                // Data on holes of the host file reads as zero and needs no cluster.
                let (mut n, hole) = match (e.kind, e.host_offset, host_files.as_mut()) {
                    (ExtentKind::Data, Some(host), Some(files)) => {
                        files.run(e.depth, host, e.length)?
                    }
                    _ => (e.length, false),
                };
                if e.kind == ExtentKind::Data && !hole {
                    // Count whole clusters, and go on from the end of the last one.
                    n = (off + n).next_multiple_of(cs) - off;
                    data += off % cs + n;
                }
                off += n;
            }
        }
    }
    if layout.full_prealloc {
        data = virtual_size;
    }
    let fully = prealloc_size(virtual_size, cs, layout.refcount_bits, l2_entry)
        + layout.luks_header.next_multiple_of(cs);
    Ok((fully - virtual_size + data, fully))
}

/// File size of a fully allocated qcow2 image (QEMU's `qcow2_calc_prealloc_size`).
fn prealloc_size(size: u64, cs: u64, refcount_bits: u64, l2_entry: u64) -> u64 {
    let aligned = size.next_multiple_of(cs);
    let mut meta = cs; // header
    let l2_entries = (aligned / cs).next_multiple_of(cs / l2_entry);
    meta += l2_entries * l2_entry;
    let l1_entries = (l2_entries * l2_entry / cs).next_multiple_of(cs / 8);
    meta += l1_entries * 8;
    meta += refcount_metadata_size((meta + aligned) / cs, cs, refcount_bits);
    meta + aligned
}

/// Bytes of refcount table and blocks covering `clusters` clusters and themselves.
fn refcount_metadata_size(clusters: u64, cs: u64, refcount_bits: u64) -> u64 {
    let blocks_per_table_cluster = cs / 8;
    let refcounts_per_block = cs * 8 / refcount_bits;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(refcounts_per_block);
        table = blocks.div_ceil(blocks_per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * cs;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(cluster_size: u64, refcount_bits: u64, extended_l2: bool) -> Qcow2Layout {
        Qcow2Layout {
            cluster_size,
            refcount_bits,
            extended_l2,
            version: 3,
            full_prealloc: false,
            has_backing: false,
            luks_header: 0,
        }
    }

    #[test]
    fn sizes_match_qemu_img_measure() {
        // Numbers printed by qemu-img 10.0 `measure -O qcow2 [-o ...] --size ...`.
        assert_eq!(
            measure_qcow2(&layout(65536, 16, false), 1 << 30, None, None).unwrap(),
            (393216, 1074135040)
        );
        assert_eq!(
            measure_qcow2(&layout(4096, 1, false), 100 << 30, None, None).unwrap(),
            (213422080, 107587604480)
        );
        assert_eq!(
            measure_qcow2(&layout(65536, 16, true), 100 << 30, None, None).unwrap(),
            (29753344, 107403935744)
        );
    }
}
