//! Opening and creating images of any format: probing by magic, format names, and the create
//! options each format accepts (qemu-img's `-o` keys, with its help texts).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use crate::block::BlockDev;
use crate::chain::{BackingPolicy, ChainCtx};
use crate::error::{Error, Result};
use crate::host_file::HostFile;
use crate::info::NodeInfo;
use crate::luks::{self, Luks, LuksCreateOptions, Passphrase};
use crate::qcow2::compressed::CompressionType;
use crate::qcow2::{self, Qcow2};
use crate::raw::Raw;
use crate::units::parse_size;

/// An image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
    Luks,
}

impl Format {
    /// Parses a format name as qemu-img spells it.
    pub fn from_name(name: &str) -> Result<Format> {
        match name {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "luks" => Ok(Format::Luks),
            _ => Err(Error::argument(format!(
                "Unknown file format '{name}' (supported: raw, qcow2, luks)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Luks => "luks",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Preallocation mode of a new image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Preallocation {
    #[default]
    Off,
    /// qcow2 only: all metadata written, data clusters reserved but not written.
    Metadata,
    /// Space reserved with fallocate.
    Falloc,
    /// Every byte written.
    Full,
}

impl Preallocation {
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "off" => Ok(Preallocation::Off),
            "metadata" => Ok(Preallocation::Metadata),
            "falloc" => Ok(Preallocation::Falloc),
            "full" => Ok(Preallocation::Full),
            _ => Err(Error::argument(format!(
                "Parameter 'preallocation' does not accept value '{name}'"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

/// Guesses the format of a file from its first bytes; raw when nothing matches.
pub fn probe(path: &Path) -> Result<Format> {
    let file = HostFile::open(path, true)?;
    let mut magic = [0u8; 8];
    file.read_at(&mut magic, 0)?;
    Ok(if magic[..4] == qcow2::header::MAGIC.to_be_bytes() {
        Format::Qcow2
    } else if magic[..6] == luks::MAGIC[..] {
        Format::Luks
    } else {
        Format::Raw
    })
}

/// How to open an image.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// The format; probed when `None`.
    pub format: Option<Format>,
    pub read_only: bool,
    /// Do not open backing files (unallocated ranges then read as zero), like QEMU's
    /// `BDRV_O_NO_BACKING`; used to describe one layer of a chain. An external data file is
    /// still opened, under `backing_policy`.
    pub no_backing: bool,
    /// Which backing files (and external data files) the image and those below it may make
    /// vdisk open; QEMU follows them all ([`BackingPolicy::Follow`], the default).
    pub backing_policy: BackingPolicy,
}

/// Opens an image, probing its format unless one is given, with its backing chain.
pub fn open(path: &Path, opts: OpenOptions) -> Result<Arc<dyn BlockDev>> {
    open_layer(path, opts, &mut ChainCtx::new(opts.backing_policy))
}

/// Opens an image like [`open`], with the passphrase that unlocks an encrypted image (LUKS, or
/// qcow2 with `encrypt.format=luks`). An encrypted image opened without one fails with
/// `InvalidArgument`; a wrong one with "Invalid password, cannot unlock any keyslot". Backing
/// files are opened without the passphrase (see [`open_with_secrets`]).
pub fn open_with_secret(
    path: &Path,
    opts: OpenOptions,
    secret: Option<&Passphrase>,
) -> Result<Arc<dyn BlockDev>> {
    open_with_secrets(path, opts, vec![secret.cloned()])
}

/// [`open_with_secret`] with a passphrase for each image of the backing chain that needs one:
/// `secrets[0]` for the image itself, `secrets[1]` for its backing file, and so on (QEMU's
/// `encrypt.key-secret` and `backing.encrypt.key-secret`).
pub fn open_with_secrets(
    path: &Path,
    opts: OpenOptions,
    secrets: Vec<Option<Passphrase>>,
) -> Result<Arc<dyn BlockDev>> {
    let mut ctx = ChainCtx::new(opts.backing_policy);
    ctx.secrets = secrets;
    open_layer(path, opts, &mut ctx)
}

/// Describes an image as `info` shows it without touching its data: read-only, backing file
/// closed, and the header of an encrypted image (LUKS, or qcow2 with `encrypt.format=luks`) read
/// without a passphrase. QEMU opens images for `info` with `BDRV_O_NO_IO` in the same way, so no
/// secret is needed and a given one is not checked.
pub fn describe(path: &Path, format: Option<Format>) -> Result<NodeInfo> {
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    match format {
        Format::Raw => Raw::open(path, true)?.info(),
        Format::Qcow2 => Qcow2::open_metadata(path)?.info(),
        Format::Luks => Luks::describe(path),
    }
}

/// Opens one image of a chain; `ctx` holds the images above it.
pub(crate) fn open_layer(
    path: &Path,
    opts: OpenOptions,
    ctx: &mut ChainCtx,
) -> Result<Arc<dyn BlockDev>> {
    ctx.enter(path)?;
    let format = match opts.format {
        Some(f) => f,
        None => probe(path)?,
    };
    let secret = ctx.secret();
    Ok(match (format, secret) {
        (Format::Raw, _) => Arc::new(Raw::open(path, opts.read_only)?),
        (Format::Qcow2, pw) => Arc::new(open_qcow2(path, opts, ctx, pw.as_ref())?),
        (Format::Luks, Some(pw)) => Arc::new(Luks::open(path, opts.read_only, &pw)?),
        (Format::Luks, None) => return Err(luks::secret_required(path)),
    })
}

/// Opens a qcow2 image of a chain (`ctx` already includes it) as `opts` says: with its backing
/// chain, or alone, its external data file opened under the policy either way.
fn open_qcow2(
    path: &Path,
    opts: OpenOptions,
    ctx: &mut ChainCtx,
    secret: Option<&Passphrase>,
) -> Result<Qcow2> {
    if opts.no_backing {
        Qcow2::open_alone(path, opts.read_only, ctx.policy, secret)
    } else {
        Qcow2::open_with_secret(path, opts.read_only, Some(ctx), secret)
    }
}

/// Options for creating an image of some format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOptions {
    Raw {
        size: u64,
        preallocation: Preallocation,
    },
    Qcow2(qcow2::CreateOptions),
    Luks(LuksCreateOptions),
}

/// One `-o` option a format accepts, for `-o help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionDesc {
    pub name: &'static str,
    /// `str`, `size`, `num` or `bool (on/off)`.
    pub kind: &'static str,
    pub help: &'static str,
}

const RAW_OPTIONS: &[OptionDesc] = &[
    OptionDesc {
        name: "preallocation",
        kind: "str",
        help: "Preallocation mode (allowed values: off, falloc, full)",
    },
    OptionDesc {
        name: "size",
        kind: "size",
        help: "Virtual disk size",
    },
];

const QCOW2_OPTIONS: &[OptionDesc] = &[
    OptionDesc {
        name: "backing_file",
        kind: "str",
        help: "File name of a base image",
    },
    OptionDesc {
        name: "backing_fmt",
        kind: "str",
        help: "Image format of the base image",
    },
    OptionDesc {
        name: "cluster_size",
        kind: "size",
        help: "qcow2 cluster size",
    },
    OptionDesc {
        name: "compat",
        kind: "str",
        help: "Compatibility level (v2 [0.10] or v3 [1.1])",
    },
    OptionDesc {
        name: "compression_type",
        kind: "str",
        help: "Compression method used for image cluster compression",
    },
    OptionDesc {
        name: "data_file",
        kind: "str",
        help: "File name of an external data file",
    },
    OptionDesc {
        name: "data_file_raw",
        kind: "bool (on/off)",
        help: "The external data file must stay valid as a raw image",
    },
    OptionDesc {
        name: "encrypt.cipher-alg",
        kind: "str",
        help: "Name of encryption cipher algorithm",
    },
    OptionDesc {
        name: "encrypt.cipher-mode",
        kind: "str",
        help: "Name of encryption cipher mode",
    },
    OptionDesc {
        name: "encrypt.format",
        kind: "str",
        help: "Encrypt the image, format choices: 'aes', 'luks'",
    },
    OptionDesc {
        name: "encrypt.hash-alg",
        kind: "str",
        help: "Name of encryption hash algorithm",
    },
    OptionDesc {
        name: "encrypt.iter-time",
        kind: "num",
        help: "Time to spend in PBKDF in milliseconds",
    },
    OptionDesc {
        name: "encrypt.ivgen-alg",
        kind: "str",
        help: "Name of IV generator algorithm",
    },
    OptionDesc {
        name: "encrypt.ivgen-hash-alg",
        kind: "str",
        help: "Name of IV generator hash algorithm",
    },
    OptionDesc {
        name: "encrypt.key-secret",
        kind: "str",
        help: "ID of secret providing qcow AES key or LUKS passphrase",
    },
    OptionDesc {
        name: "encryption",
        kind: "bool (on/off)",
        help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    },
    OptionDesc {
        name: "extended_l2",
        kind: "bool (on/off)",
        help: "Extended L2 tables",
    },
    OptionDesc {
        name: "lazy_refcounts",
        kind: "bool (on/off)",
        help: "Postpone refcount updates",
    },
    OptionDesc {
        name: "preallocation",
        kind: "str",
        help: "Preallocation mode (allowed values: off, metadata, falloc, full)",
    },
    OptionDesc {
        name: "refcount_bits",
        kind: "num",
        help: "Width of a reference count entry in bits",
    },
    OptionDesc {
        name: "size",
        kind: "size",
        help: "Virtual disk size",
    },
];

/// The `-o` options a format accepts when creating an image.
pub fn create_options_help(format: Format) -> &'static [OptionDesc] {
    match format {
        Format::Raw => RAW_OPTIONS,
        Format::Qcow2 => QCOW2_OPTIONS,
        Format::Luks => luks::create_options_help(),
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(Error::argument(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

impl CreateOptions {
    /// Builds create options from `-o key=value` pairs. `size` is the SIZE argument, if given
    /// (a `size=` option overrides it, as in qemu-img).
    pub fn from_pairs(
        format: Format,
        size: Option<u64>,
        pairs: &[(String, String)],
    ) -> Result<CreateOptions> {
        if format == Format::Luks {
            return LuksCreateOptions::from_pairs(size, pairs).map(CreateOptions::Luks);
        }
        let known = create_options_help(format);
        let mut size = size;
        let mut qcow = qcow2::CreateOptions::default();
        let mut prealloc = Preallocation::Off;
        let mut encrypt = Vec::new();
        for (key, value) in pairs {
            if !known.iter().any(|o| o.name == key) {
                return Err(Error::argument(format!("Invalid parameter '{key}'")));
            }
            if key.starts_with("encrypt.") {
                encrypt.push((key.clone(), value.clone()));
                continue;
            }
            match key.as_str() {
                "size" => size = Some(parse_size(value)?),
                "preallocation" => prealloc = Preallocation::from_name(value)?,
                "cluster_size" => qcow.cluster_size = parse_size(value)?,
                "compat" => {
                    qcow.version = match value.as_str() {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => {
                            return Err(Error::argument(format!(
                                "Parameter 'compat' does not accept value '{value}'"
                            )))
                        }
                    }
                }
                "lazy_refcounts" => qcow.lazy_refcounts = parse_bool(key, value)?,
                "extended_l2" => qcow.extended_l2 = parse_bool(key, value)?,
                "backing_file" => qcow.backing_file = Some(value.clone()),
                "data_file" => qcow.data_file = Some(value.clone()),
                "data_file_raw" => qcow.data_file_raw = parse_bool(key, value)?,
                "compression_type" => {
                    qcow.compression_type = match value.as_str() {
                        "zlib" => CompressionType::Zlib,
                        "zstd" => CompressionType::Zstd,
                        _ => {
                            return Err(Error::argument(format!(
                                "Parameter 'compression-type' does not accept value '{value}'"
                            )))
                        }
                    }
                }
                "backing_fmt" => {
                    Format::from_name(value)?;
                    qcow.backing_format = Some(value.clone())
                }
                "refcount_bits" => {
                    qcow.refcount_bits = value.parse().map_err(|_| {
                        Error::argument("Parameter 'refcount_bits' expects a number")
                    })?
                }
                "encryption" => {
                    if parse_bool(key, value)? {
                        encrypt.push(("encrypt.format".into(), "aes".into()));
                    }
                }
                _ => unreachable!("every known option is handled"),
            }
        }
        let need_size =
            || size.ok_or_else(|| Error::argument("Image creation needs a size parameter"));
        match format {
            Format::Raw => {
                if prealloc == Preallocation::Metadata {
                    return Err(Error::argument(
                        "Parameter 'preallocation' does not accept value 'metadata'",
                    ));
                }
                Ok(CreateOptions::Raw {
                    size: need_size()?,
                    preallocation: prealloc,
                })
            }
            Format::Qcow2 => {
                if qcow.backing_file.is_none() {
                    need_size()?;
                }
                qcow.size = size;
                qcow.preallocation = prealloc;
                qcow.encrypt = qcow2_encrypt_options(&encrypt)?;
                qcow.validate()?;
                Ok(CreateOptions::Qcow2(qcow))
            }
            Format::Luks => unreachable!("LUKS options are parsed above"),
        }
    }

    pub fn format(&self) -> Format {
        match self {
            CreateOptions::Raw { .. } => Format::Raw,
            CreateOptions::Qcow2(_) => Format::Qcow2,
            CreateOptions::Luks(_) => Format::Luks,
        }
    }
}

/// The LUKS options of a new qcow2 image from its `encrypt.*` pairs (qemu's names and defaults);
/// `None` when it is not encrypted.
fn qcow2_encrypt_options(pairs: &[(String, String)]) -> Result<Option<LuksCreateOptions>> {
    if pairs.is_empty() {
        return Ok(None);
    }
    let mut format = None;
    let mut inner = Vec::new();
    for (key, value) in pairs {
        match key.strip_prefix("encrypt.") {
            Some("format") => format = Some(value.as_str()),
            Some(k) => inner.push((k.to_string(), value.clone())),
            None => unreachable!("only encrypt.* pairs are collected"),
        }
    }
    match format {
        None => return Err(Error::argument("Parameter 'encrypt.format' is missing")),
        Some("luks") => {}
        Some("aes") => {
            return Err(Error::argument(
                "qcow2 legacy AES encryption (encrypt.format=aes, encryption=on) is not \
                 supported; use encrypt.format=luks",
            ))
        }
        Some(other) => {
            return Err(Error::argument(format!(
                "Parameter 'encrypt.format' does not accept value '{other}'"
            )))
        }
    }
    if !inner.iter().any(|(k, _)| k == "key-secret") {
        return Err(Error::argument(
            "Parameter 'encrypt.key-secret' is required for cipher",
        ));
    }
    let o = LuksCreateOptions::from_pairs(Some(0), &inner).map_err(|e| match e {
        Error::InvalidArgument { what } => Error::InvalidArgument {
            what: what.replace("Parameter '", "Parameter 'encrypt."),
        },
        other => other,
    })?;
    Ok(Some(o))
}

/// Creates an image (an existing file is replaced).
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    match opts {
        CreateOptions::Raw {
            size,
            preallocation,
        } => Raw::create(path, *size, *preallocation),
        CreateOptions::Qcow2(o) => qcow2::create(path, o),
        CreateOptions::Luks(o) => Luks::create(path, o),
    }
}

/// How [`resize_image`] changes an image.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResizeOptions {
    /// The format; probed when `None`.
    pub format: Option<Format>,
    /// Allow a new size smaller than the current one.
    pub shrink: bool,
    /// How new space is allocated.
    pub preallocation: Preallocation,
    /// Which backing files (and external data files) a qcow2 image may make vdisk open: resizing
    /// opens its chain, as qemu-img does, so that new space reads as zero over a backing file.
    pub backing_policy: BackingPolicy,
}

/// Changes the virtual size of an image (`resize`) to `new_size` as `opts` says. An encrypted
/// image (LUKS, qcow2 with `encrypt.format=luks`) needs its passphrase in `secret`, as in
/// qemu-img; as in QEMU, preallocated new space of an encrypted qcow2 image reads as noise (the
/// zeros stored there are decrypted). A qcow2 image that names a file the backing policy refuses
/// is refused before anything changes.
pub fn resize_image(
    path: &Path,
    new_size: u64,
    opts: ResizeOptions,
    secret: Option<&Passphrase>,
) -> Result<()> {
    let format = match opts.format {
        Some(f) => f,
        None => probe(path)?,
    };
    let (shrink, prealloc) = (opts.shrink, opts.preallocation);
    match format {
        Format::Raw => Raw::resize(path, new_size, shrink, prealloc),
        Format::Qcow2 => {
            let policy = opts.backing_policy;
            qcow2::resize_under(path, new_size, shrink, prealloc, secret, policy)
        }
        Format::Luks => luks::resize(path, new_size, shrink, prealloc, secret),
    }
}
