//! `vdisk amend`: change format options of an existing qcow2 image, or the key slots of an
//! encrypted one (LUKS, or qcow2 with `encrypt.format=luks`).

use anyhow::{anyhow, bail, Result};
use vdisk_formats::image::{create_options_help, OptionDesc};
use vdisk_formats::luks::{self, Luks, LuksAmend};
use vdisk_formats::qcow2::amend::{
    amend_options_help, is_keyslot_option, known_amend_options, rewrite_header, HeaderChanges,
};
use vdisk_formats::qcow2::refcount_width::change_refcount_width;
use vdisk_formats::{Format, FormatSpecific, Passphrase};

use crate::errors::{describe, UsageError};
use crate::image_args::{check_cache_mode, ImageOpts, ImageRef};
use crate::objects::Objects;
use crate::options::{self, Typed};

/// Update format-specific options of an image.
///
/// qcow2 images can change their compatibility level (compat=0.10 or 1.1), lazy refcounts,
/// refcount width and virtual size (size=). Options that fix the layout (cluster_size,
/// extended_l2 ...) can only be chosen at creation; to change the backing file use `rebase`.
///
/// Encrypted images (LUKS, and qcow2 with `encrypt.` before each option) add, change and remove
/// passphrases: state=active with new-secret= fills a free key slot (or keyslot=N),
/// state=inactive with old-secret= (or keyslot=N) erases the slots that match. Removing the last
/// passphrase needs --force. The image's own secret is given with --image-opts.
///
/// Examples:
///
///   vdisk amend -o compat=1.1 old.qcow2
///
///   vdisk amend -o lazy_refcounts=on disk.qcow2
///
///   vdisk amend --object secret,id=s0,file=old.txt --object secret,id=s1,file=new.txt \
///     --image-opts driver=luks,key-secret=s0,file.filename=disk.luks \
///     -o state=active,new-secret=s1
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    image: ImageOpts,

    /// Options to change, `key=value` pairs separated by commas; `-o help` lists them
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    options: Vec<String>,

    /// Allow changes qemu-img calls unsafe (accepted; vdisk refuses those it cannot do safely)
    #[arg(long = "force")]
    force: bool,

    /// Show progress (accepted; the changes vdisk makes are instant)
    #[arg(short = 'p', long = "progress")]
    progress: bool,

    /// Print nothing but errors
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,

    /// Cache mode (accepted; vdisk uses the host page cache)
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,

    /// The image to change
    #[arg(value_name = "FILENAME")]
    filename: Option<String>,

    /// More file names, refused with qemu-img's message
    #[arg(hide = true, allow_hyphen_values = true)]
    extra: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    let list = options::parse_lists(&args.options)?;
    if args.options.is_empty() {
        return Err(UsageError::error("amend", "Must specify options (-o)"));
    }
    let (Some(file), true) = (args.filename.as_deref(), args.extra.is_empty()) else {
        return Err(anyhow!("Expecting one image file name"));
    };
    check_cache_mode(args.cache.as_deref(), "")?;
    let image = args.image.image(file)?;
    let format = image.format_or_probe(false)?;
    if format == Format::Luks {
        return amend_luks(&args, &image, &list);
    }
    if format != Format::Qcow2 {
        bail!("Format driver '{format}' does not support option amendment");
    }
    if list.help {
        return print_amend_help(format, &amend_options_help());
    }
    let checked = options::check_types(&list.pairs, &known_amend_options())?;
    let dev = image.open_as(format, true, true)?;
    let info = dev.info().map_err(|e| anyhow!(describe(&e)))?;
    drop(dev);
    let Some(FormatSpecific::Qcow2(q)) = &info.format_specific else {
        bail!("Format driver '{format}' does not support option amendment");
    };

    let mut changes = HeaderChanges::default();
    let mut new_size = None;
    let mut refcount_order = None;
    let mut keyslots = Vec::new();
    for o in &checked {
        match (o.name.as_str(), &o.typed) {
            ("compat", _) => {
                changes.version = Some(match o.text.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    other => bail!("Invalid compatibility level: '{other}'"),
                })
            }
            ("lazy_refcounts", Typed::Bool(b)) => changes.lazy_refcounts = Some(*b),
            ("size", Typed::Number(n)) => new_size = Some(*n),
            ("refcount_bits", Typed::Number(n)) => {
                if !n.is_power_of_two() || *n > 64 {
                    bail!("Refcount width must be a power of two and may not exceed 64 bits");
                }
                refcount_order = Some(n.trailing_zeros());
            }
            (name, _) if is_keyslot_option(name) => keyslots.push((o.name.clone(), o.text.clone())),
            ("backing_file" | "backing_fmt", _) => {
                bail!("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.")
            }
            (name, _) => bail!(
                "Invalid parameter '{name}'\nThis option is only supported for image creation"
            ),
        }
    }
    let v2_after = changes.version.map_or(q.compat == "0.10", |v| v == 2);
    if v2_after && refcount_order.is_some_and(|o| o != 4) {
        bail!(
            "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"
        );
    }
    if changes.version == Some(2) && changes.lazy_refcounts != Some(true) && q.refcount_bits != 16 {
        bail!("compat=0.10 requires refcount_bits=16");
    }
    if changes.version == Some(2) && changes.lazy_refcounts == Some(true) {
        bail!(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)"
        );
    }
    if new_size.is_some_and(|s| s != info.virtual_size) {
        // Resizing opens the chain, under the backing policy: a refusal comes before anything
        // is changed, and names the image.
        image.open_as(format, true, false)?;
    }
    if !keyslots.is_empty() {
        if info.encrypted != Some(true) {
            bail!("Can't amend encryption options - encryption not present");
        }
        let objects = Objects::parse(&args.image.object)?;
        let amend = vdisk_formats::qcow2::amend_pairs(&keyslots, &mut resolver(&objects))
            .map_err(|e| anyhow!(describe(&e)))?;
        let Some(secret) = &image.secret else {
            return Err(
                image.could_not_open("Parameter 'encrypt.key-secret' is required for cipher")
            );
        };
        vdisk_formats::qcow2::amend_encryption(&image.path, secret, &amend, args.force)
            .map_err(|e| anyhow!(describe(&e)))?;
    }
    if changes != HeaderChanges::default() {
        rewrite_header(&image.path, &changes).map_err(|e| anyhow!(describe(&e)))?;
    }
    if let Some(order) = refcount_order.filter(|&o| 1 << o != q.refcount_bits) {
        change_refcount_width(&image.path, order).map_err(|e| anyhow!(describe(&e)))?;
    }
    if let Some(size) = new_size.filter(|&s| s != info.virtual_size) {
        let opts = vdisk_formats::ResizeOptions {
            format: Some(format),
            shrink: true,
            preallocation: vdisk_formats::Preallocation::Off,
            backing_policy: crate::backing_policy::get(),
        };
        vdisk_formats::resize_image(&image.path, size, opts, image.secret.as_ref())
            .map_err(|e| anyhow!(describe(&e)))?;
    }
    Ok(())
}

/// `amend` of a LUKS image: its key slots.
fn amend_luks(args: &Args, image: &ImageRef, list: &options::OptionList) -> Result<()> {
    if list.help {
        return print_amend_help(Format::Luks, luks::amend_options_help());
    }
    let known: Vec<OptionDesc> = luks::amend_options_help()
        .iter()
        .chain(create_options_help(Format::Luks))
        .copied()
        .collect();
    let checked = options::check_types(&list.pairs, &known)?;
    let mut pairs = Vec::new();
    for o in &checked {
        if !luks::amend_options_help().iter().any(|a| a.name == o.name) {
            bail!(
                "Invalid parameter '{}'\nThis option is only supported for image creation",
                o.name
            );
        }
        pairs.push((o.name.clone(), o.text.clone()));
    }
    let objects = Objects::parse(&args.image.object)?;
    let amend = LuksAmend::from_pairs(&pairs, &mut resolver(&objects))
        .map_err(|e| anyhow!(describe(&e)))?;
    let Some(secret) = &image.secret else {
        return Err(image.could_not_open("Parameter 'key-secret' is required for cipher"));
    };
    let img = Luks::open(&image.path, false, secret).map_err(|e| image.open_error(&e))?;
    img.amend(&amend, args.force)
        .map_err(|e| anyhow!(describe(&e)))?;
    vdisk_formats::BlockDev::flush(&img).map_err(|e| anyhow!(describe(&e)))
}

/// Looks up the secrets `new-secret=` and `old-secret=` name.
fn resolver(objects: &Objects) -> impl FnMut(&str) -> vdisk_formats::Result<Passphrase> + '_ {
    |id| match objects.secret(id) {
        Ok(bytes) => Ok(Passphrase::new(bytes.to_vec())),
        Err(e) => Err(vdisk_formats::Error::InvalidArgument {
            what: format!("{e:#}"),
        }),
    }
}

/// `-o help`, as qemu-img's amend prints it.
fn print_amend_help(format: Format, known: &[OptionDesc]) -> Result<()> {
    println!("Amend options for '{format}':");
    for line in options::help_lines(known) {
        println!("{line}");
    }
    Ok(())
}
