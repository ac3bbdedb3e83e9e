//! `vdisk info`: describe an image, in qemu-img's human or JSON layout.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Map, Value};
use vdisk_formats::{Format, FormatSpecific, NodeInfo};

use crate::errors::{describe, UsageError};
use crate::image_args::{ImageOpts, ImageRef};
use crate::objects::Objects;
use crate::output::{human_size, qemu_json};

/// Display information about an image.
///
/// Prints the format, the virtual size, the space used on the host, the format's own details and
/// the protocol (file) node below it, as qemu-img does. The image is opened read-only and, unless
/// --backing-chain is given, its backing file is not opened.
///
/// Examples:
///
///   vdisk info disk.qcow2
///
///   vdisk info --output=json --backing-chain overlay.qcow2
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    image: ImageOpts,

    /// Output format: human (the default) or json
    #[arg(long = "output", value_name = "human|json")]
    output: Option<String>,

    /// Also describe every image of the backing chain
    #[arg(short = 'b', long = "backing-chain")]
    backing_chain: bool,

    /// The image to describe
    #[arg(value_name = "FILENAME")]
    filename: Option<String>,

    /// More file names, refused with qemu-img's message
    #[arg(hide = true, allow_hyphen_values = true)]
    extra: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    Human,
    Json,
}

pub fn run(args: Args) -> Result<()> {
    let output = match args.output.as_deref() {
        None | Some("human") => Output::Human,
        Some("json") => Output::Json,
        Some(other) => {
            return Err(UsageError::error(
                "info",
                format!("--output expects 'human' or 'json' not '{other}'"),
            ))
        }
    };
    let (Some(file), true) = (args.filename.clone(), args.extra.is_empty()) else {
        return Err(UsageError::error("info", "Expecting one image file name"));
    };
    // As qemu-img (which opens images for `info` with BDRV_O_NO_IO), an encrypted image is
    // described from its header: its secret is neither needed nor looked up.
    Objects::parse(&args.image.object)?;
    let opts = &args.image;
    let image = ImageRef::parse(&file, opts.format.as_deref(), opts.image_opts)?;
    if image.backing_key_secret.is_some() {
        // `info` leaves the backing file closed, so qemu-img knows no such option.
        let keys = file
            .split(',')
            .filter_map(|kv| kv.split_once('=').map(|(k, _)| k));
        let key = keys
            .into_iter()
            .find(|k| k.starts_with("backing."))
            .unwrap_or("backing");
        let driver = image.format.as_deref().unwrap_or("raw");
        return Err(image.could_not_open(format!(
            "Block format '{driver}' does not support the option '{key}'"
        )));
    }
    let format = image.format_or_probe(true)?;
    let mut top =
        vdisk_formats::describe(&image.path, Some(format)).map_err(|e| image.open_error(&e))?;
    if let Some(name) = &image.json_name {
        top.filename = name.clone();
    }
    let nodes = if args.backing_chain {
        chain_info(&image.path, top)?
    } else {
        vec![top]
    };
    match output {
        Output::Human => {
            let texts: Vec<String> = nodes.iter().map(human).collect();
            print!("{}", texts.join("\n"));
        }
        Output::Json if args.backing_chain => {
            let list = Value::Array(nodes.iter().map(to_json).collect());
            println!("{}", qemu_json(&list));
        }
        Output::Json => println!("{}", qemu_json(&to_json(&nodes[0]))),
    }
    Ok(())
}

/// Describes one image from its metadata (backing file closed, no secret needed).
fn node_info(file: &Path, format: Option<&str>) -> Result<NodeInfo> {
    let could_not_open = |why: String| anyhow!("Could not open '{}': {why}", file.display());
    let format = format
        .map(|name| {
            Format::from_name(name).map_err(|_| could_not_open(format!("Unknown driver '{name}'")))
        })
        .transpose()?;
    vdisk_formats::describe(file, format).map_err(|e| could_not_open(describe(&e)))
}

/// The image and every image below it, top first; each backing file is opened by the name and
/// format its overlay records.
fn chain_info(file: &Path, top: NodeInfo) -> Result<Vec<NodeInfo>> {
    let mut nodes = vec![top];
    let mut seen = HashSet::new();
    seen.insert(std::fs::canonicalize(file)?);
    let mut above = file.to_path_buf();
    while let Some(backing) = nodes.last().and_then(|n| n.backing.clone()) {
        crate::backing_policy::get()
            .check_backing(&above, &backing.filename, backing.format.as_deref())
            .map_err(|e| anyhow!("Could not open '{}': {}", above.display(), describe(&e)))?;
        let path = PathBuf::from(&backing.full_filename);
        above = path.clone();
        if let Ok(canonical) = std::fs::canonicalize(&path) {
            if !seen.insert(canonical) {
                bail!(
                    "Backing file '{}' creates an infinite loop.",
                    backing.full_filename
                );
            }
        }
        nodes.push(node_info(&path, backing.format.as_deref())?);
    }
    Ok(nodes)
}

/// `virtual size: 1 GiB (1073741824 bytes)`.
fn size_with_bytes(n: u64) -> String {
    format!("{} ({n} bytes)", human_size(n))
}

/// The human-readable description, as `qemu-img info` prints it.
fn human(info: &NodeInfo) -> String {
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(format!("image: {}", info.filename));
    line(format!("file format: {}", info.format));
    line(format!(
        "virtual size: {}",
        size_with_bytes(info.virtual_size)
    ));
    line(format!("disk size: {}", disk_size(info)));
    if info.encrypted == Some(true) {
        line("encrypted: yes".to_string());
    }
    if let Some(cs) = info.cluster_size {
        line(format!("cluster_size: {cs}"));
    }
    if info.dirty_flag {
        line("cleanly shut down: no".to_string());
    }
    if let Some(b) = &info.backing {
        if b.full_filename != b.filename {
            line(format!(
                "backing file: {} (actual path: {})",
                b.filename, b.full_filename
            ));
        } else {
            line(format!("backing file: {}", b.filename));
        }
        if let Some(f) = &b.format {
            line(format!("backing file format: {f}"));
        }
    }
    out.push_str(&crate::cmd::snapshot::table(&info.snapshots));
    dump_specific(&mut out, info, 0);
    dump_children(&mut out, info, "", 1);
    out
}

fn disk_size(info: &NodeInfo) -> String {
    info.actual_size
        .map_or_else(|| "unavailable".to_string(), human_size)
}

/// `Child node '/file':` sections; the child is a protocol node described with protocol words.
fn dump_children(out: &mut String, info: &NodeInfo, parent: &str, depth: usize) {
    let pad = "    ".repeat(depth);
    for child in &info.children {
        let path = format!("{parent}/{}", child.name);
        let node = &child.info;
        out.push_str(&format!(
            "{}Child node '{path}':\n",
            "    ".repeat(depth - 1)
        ));
        out.push_str(&format!("{pad}filename: {}\n", node.filename));
        out.push_str(&format!("{pad}protocol type: {}\n", node.format));
        out.push_str(&format!(
            "{pad}file length: {}\n",
            size_with_bytes(node.virtual_size)
        ));
        out.push_str(&format!("{pad}disk size: {}\n", disk_size(node)));
        if node.dirty_flag {
            out.push_str(&format!("{pad}cleanly shut down: no\n"));
        }
        dump_specific(out, node, depth);
        dump_children(out, node, &path, depth + 1);
    }
}

/// `Format specific information:` with one `key: value` line per field of the format's data
/// (nothing for a plain file, whose details are empty).
fn dump_specific(out: &mut String, info: &NodeInfo, depth: usize) {
    let Some(data) = info.format_specific.as_ref().and_then(specific_data) else {
        return;
    };
    out.push_str(&format!(
        "{}Format specific information:\n",
        "    ".repeat(depth)
    ));
    dump_value(out, &data, depth + 1);
}

/// A format-specific object in qemu's human layout: `key name: value` lines (dashes in keys
/// become spaces), nested objects and lists indented below their key, list items as `[N]:`.
fn dump_value(out: &mut String, value: &Value, depth: usize) {
    let pad = "    ".repeat(depth);
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(_) | Value::Array(_) => None,
        other => Some(other.to_string()),
    };
    let entries: Vec<(String, &Value)> = match value {
        Value::Object(m) => m.iter().map(|(k, v)| (k.replace('-', " "), v)).collect(),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("[{i}]"), v))
            .collect(),
        _ => return,
    };
    for (key, v) in entries {
        match scalar(v) {
            Some(text) => out.push_str(&format!("{pad}{key}: {text}\n")),
            None => {
                out.push_str(&format!("{pad}{key}:\n"));
                dump_value(out, v, depth + 1);
            }
        }
    }
}

/// The JSON object of `qemu-img info --output=json`, keys in the order qemu prints them (the
/// iteration order of its hash table, fixed for a given set of keys).
fn to_json(info: &NodeInfo) -> Value {
    let mut m = Map::new();
    let children: Vec<Value> = info
        .children
        .iter()
        .map(|c| json!({"name": c.name, "info": to_json(&c.info)}))
        .collect();
    m.insert("children".into(), Value::Array(children));
    if !info.snapshots.is_empty() {
        m.insert(
            "snapshots".into(),
            info.snapshots.iter().map(snapshot_json).collect(),
        );
    }
    if let Some(f) = info.backing.as_ref().and_then(|b| b.format.as_ref()) {
        m.insert("backing-filename-format".into(), json!(f));
    }
    m.insert("virtual-size".into(), json!(info.virtual_size));
    m.insert("filename".into(), json!(info.filename));
    if let Some(cs) = info.cluster_size {
        m.insert("cluster-size".into(), json!(cs));
    }
    m.insert("format".into(), json!(info.format));
    if let Some(a) = info.actual_size {
        m.insert("actual-size".into(), json!(a));
    }
    if let Some(s) = &info.format_specific {
        m.insert("format-specific".into(), specific_json(s));
    }
    if let Some(b) = &info.backing {
        m.insert("full-backing-filename".into(), json!(b.full_filename));
    }
    if info.encrypted == Some(true) {
        m.insert("encrypted".into(), json!(true));
    }
    if let Some(b) = &info.backing {
        m.insert("backing-filename".into(), json!(b.filename));
    }
    m.insert("dirty-flag".into(), json!(info.dirty_flag));
    Value::Object(m)
}

/// One entry of `"snapshots"`, keys in qemu-img's order.
fn snapshot_json(s: &vdisk_formats::SnapshotInfo) -> Value {
    let mut m = Map::new();
    if let Some(n) = s.icount {
        m.insert("icount".into(), json!(n));
    }
    m.insert("vm-clock-nsec".into(), json!(s.vm_clock_nsec));
    m.insert("name".into(), json!(s.name));
    m.insert("date-sec".into(), json!(s.date_sec));
    m.insert("date-nsec".into(), json!(s.date_nsec));
    m.insert("vm-clock-sec".into(), json!(s.vm_clock_sec));
    m.insert("id".into(), json!(s.id));
    m.insert("vm-state-size".into(), json!(s.vm_state_size));
    Value::Object(m)
}

fn specific_json(s: &FormatSpecific) -> Value {
    match (s, specific_data(s)) {
        (FormatSpecific::Qcow2(_), Some(d)) => json!({"type": "qcow2", "data": d}),
        (FormatSpecific::Luks(_), Some(d)) => json!({"type": "luks", "data": d}),
        _ => json!({"type": "file", "data": {}}),
    }
}

/// The `data` of `format-specific`, keys in qemu-img's order (also the order of its human
/// layout); `None` for a plain file.
fn specific_data(s: &FormatSpecific) -> Option<Value> {
    match s {
        FormatSpecific::File => None,
        FormatSpecific::Qcow2(q) => {
            let mut d = Map::new();
            d.insert("compat".into(), json!(q.compat));
            if let Some(c) = &q.compression_type {
                d.insert("compression-type".into(), json!(c));
            }
            if let Some(l) = q.lazy_refcounts {
                d.insert("lazy-refcounts".into(), json!(l));
            }
            if let Some(b) = &q.bitmaps {
                d.insert("bitmaps".into(), b.iter().map(bitmap_json).collect());
            }
            d.insert("refcount-bits".into(), json!(q.refcount_bits));
            if let Some(l) = &q.encrypt {
                d.insert("encrypt".into(), luks_json(l, Some("luks")));
            }
            if let Some(c) = q.corrupt {
                d.insert("corrupt".into(), json!(c));
            }
            if let Some(e) = q.extended_l2 {
                d.insert("extended-l2".into(), json!(e));
            }
            Some(Value::Object(d))
        }
        FormatSpecific::Luks(l) => Some(luks_json(l, None)),
    }
}

/// One entry of `bitmaps`: flags (`in-use` before `auto`), name, granularity.
fn bitmap_json(b: &vdisk_formats::BitmapInfo) -> Value {
    let mut flags = Vec::new();
    if b.in_use {
        flags.push("in-use");
    }
    if b.auto {
        flags.push("auto");
    }
    json!({"flags": flags, "name": b.name, "granularity": b.granularity})
}

/// LUKS data with qemu-img's keys in its order (LUKS2 images add a `luks2` object). qcow2's
/// `encrypt` object is the same with the encryption `format` after `uuid`.
fn luks_json(l: &vdisk_formats::LuksInfo, format: Option<&str>) -> Value {
    let mut d = Map::new();
    d.insert("ivgen-alg".into(), json!(l.ivgen_alg));
    d.insert("detached-header".into(), json!(l.detached_header));
    d.insert("hash-alg".into(), json!(l.hash_alg));
    d.insert("cipher-alg".into(), json!(l.cipher_alg));
    d.insert("uuid".into(), json!(l.uuid));
    if let Some(f) = format {
        d.insert("format".into(), json!(f));
    }
    if let Some(h) = &l.ivgen_hash_alg {
        d.insert("ivgen-hash-alg".into(), json!(h));
    }
    d.insert("cipher-mode".into(), json!(l.cipher_mode));
    let slots: Vec<Value> = l
        .slots
        .iter()
        .map(|s| {
            let mut m = Map::new();
            m.insert("active".into(), json!(s.active));
            if let Some(i) = s.iters {
                m.insert("iters".into(), json!(i));
            }
            m.insert("key-offset".into(), json!(s.key_offset));
            if let Some(n) = s.stripes {
                m.insert("stripes".into(), json!(n));
            }
            Value::Object(m)
        })
        .collect();
    d.insert("slots".into(), json!(slots));
    d.insert("payload-offset".into(), json!(l.payload_offset));
    d.insert("master-key-iters".into(), json!(l.master_key_iters));
    if let Some(v2) = &l.luks2 {
        d.insert(
            "luks2".into(),
            json!({
                "sector-size": v2.sector_size,
                "iv-tweak": v2.iv_tweak,
                "segment-size": v2.segment_size,
                "label": v2.label,
                "subsystem": v2.subsystem,
                "epoch": v2.seqid,
                "metadata-size": v2.metadata_size,
                "keyslots-size": v2.keyslots_size,
                "damaged-header": v2.damaged_header,
                "tokens": v2.tokens,
                "keyslots": v2.keyslots.iter().map(|k| json!({
                    "id": k.id, "kdf": k.kdf, "iterations": k.iterations,
                    "memory": k.memory_kib, "parallel": k.parallel, "key-size": k.key_size,
                    "area-offset": k.area_offset, "area-size": k.area_size,
                    "area-encryption": k.area_encryption, "priority": k.priority,
                })).collect::<Vec<_>>(),
            }),
        );
    }
    Value::Object(d)
}
