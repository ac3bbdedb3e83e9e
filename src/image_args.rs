//! The arguments every qemu-img command shares: how an image is named (`FILENAME` with `-f FMT`, or
//! an `--image-opts` option string), cache modes, `--output`, and opening an image with qemu-img's
//! error messages.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use vdisk_formats::{BlockDev, CreateOptions, Format, NodeInfo, OpenOptions, Passphrase};

use crate::errors::{describe, UsageError};
use crate::objects::Objects;
use crate::options::parse_lists;

/// An image as a command names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The file to open.
    pub path: PathBuf,
    /// How messages name the image: the file name, or the whole `--image-opts` string.
    pub display: String,
    /// The format name asked for (`-f` or `driver=`); probed when `None`.
    pub format: Option<String>,
    /// The id of the `--object secret` that unlocks an encrypted image (`key-secret=`).
    pub key_secret: Option<String>,
    /// That secret, once looked up ([`ImageRef::with_secret`]).
    pub secret: Option<Passphrase>,
    /// The id of the secret that unlocks an encrypted backing file
    /// (`backing.encrypt.key-secret=` or `backing.key-secret=`), and that secret once looked up.
    pub backing_key_secret: Option<String>,
    pub backing_secret: Option<Passphrase>,
    /// The `json:{...}` name QEMU gives an image opened with options beyond its driver and file
    /// (here: a key secret), shown by `info` in place of the file name.
    pub json_name: Option<String>,
}

impl ImageRef {
    /// A plain file name with an optional `-f` format.
    pub fn file(name: &str, format: Option<&str>) -> ImageRef {
        ImageRef {
            path: PathBuf::from(name),
            display: name.to_string(),
            format: format.map(str::to_string),
            key_secret: None,
            secret: None,
            backing_key_secret: None,
            backing_secret: None,
            json_name: None,
        }
    }

    /// FILENAME as the command line gives it: with `image_opts` an option string such as
    /// `driver=qcow2,file.filename=disk.qcow2`, else a file name read with `format`.
    pub fn parse(arg: &str, format: Option<&str>, image_opts: bool) -> Result<ImageRef> {
        let could_not_open = |why: String| anyhow!("Could not open '{arg}': {why}");
        if !image_opts {
            return match arg.strip_prefix("json:") {
                Some(text) => ImageRef::from_pairs(arg, &json_pairs(text).map_err(could_not_open)?),
                None => Ok(ImageRef::file(arg, format)),
            };
        }
        if format.is_some() {
            bail!("--image-opts and --format are mutually exclusive");
        }
        if !arg.contains('=') {
            return Err(could_not_open(format!(
                "Cannot find device='{arg}' nor node-name='{arg}'"
            )));
        }
        ImageRef::from_pairs(arg, &parse_lists(&[arg.to_string()])?.pairs)
    }

    /// The image an option list names (`--image-opts`, or a `json:` file name flattened to
    /// dotted keys); `arg` is how messages name it.
    fn from_pairs(arg: &str, pairs: &[(String, String)]) -> Result<ImageRef> {
        let could_not_open = |why: String| anyhow!("Could not open '{arg}': {why}");
        let mut image = ImageRef {
            path: PathBuf::new(),
            display: arg.to_string(),
            format: None,
            key_secret: None,
            secret: None,
            backing_key_secret: None,
            backing_secret: None,
            json_name: None,
        };
        let mut file = None;
        let mut unknown = None;
        let mut secret_key = "";
        for (key, value) in pairs {
            match key.as_str() {
                "driver" => image.format = Some(value.clone()),
                "file.filename" | "file" => file = Some(value.clone()),
                "file.driver" if value == "file" => {}
                "key-secret" | "encrypt.key-secret" => {
                    secret_key = if key == "key-secret" {
                        "key-secret"
                    } else {
                        "encrypt.key-secret"
                    };
                    image.key_secret = Some(value.clone());
                }
                "backing.encrypt.key-secret" | "backing.key-secret" => {
                    image.backing_key_secret = Some(value.clone())
                }
                // The backing file the image names, spelled out (check_backing_override).
                "backing.driver" | "backing.file.filename" | "backing.file" => {}
                "backing.file.driver" if value == "file" => {}
                "filename" if image.format.is_none() => {
                    return Err(could_not_open("Must specify either driver or file".into()))
                }
                _ => unknown = unknown.or(Some(key.clone())),
            }
        }
        let Some(file) = file else {
            return Err(could_not_open(
                "A block device must be specified for \"file\"".into(),
            ));
        };
        if let Some(key) = unknown {
            let driver = image.format.as_deref().unwrap_or("raw");
            return Err(could_not_open(format!(
                "Block format '{driver}' does not support the option '{key}'"
            )));
        }
        if let (Some(id), Some(driver)) = (&image.key_secret, &image.format) {
            let q = |t: &str| serde_json::Value::from(t).to_string();
            let file_node = format!("{{\"driver\": \"file\", \"filename\": {}}}", q(&file));
            // The member order of QEMU's hash table for these keys.
            image.json_name = Some(if secret_key == "key-secret" {
                format!(
                    "json:{{\"driver\": {}, \"file\": {file_node}, \"key-secret\": {}}}",
                    q(driver),
                    q(id)
                )
            } else {
                format!(
                    "json:{{\"encrypt.key-secret\": {}, \"driver\": {}, \"file\": {file_node}}}",
                    q(id),
                    q(driver)
                )
            });
        }
        image.path = PathBuf::from(file);
        image.check_backing_override(pairs)?;
        Ok(image)
    }

    /// Refuses `backing.file.filename` naming another file than the image's own backing file:
    /// QEMU would open that one instead; vdisk always opens the file the image names.
    fn check_backing_override(&self, pairs: &[(String, String)]) -> Result<()> {
        let named = pairs
            .iter()
            .find(|(k, _)| k == "backing.file.filename" || k == "backing.file");
        let Some((key, name)) = named else {
            return Ok(());
        };
        let format = self
            .format
            .as_deref()
            .and_then(|f| Format::from_name(f).ok());
        let recorded = vdisk_formats::describe(&self.path, format)
            .ok()
            .and_then(|info| info.backing)
            .and_then(|b| std::fs::canonicalize(b.full_filename).ok());
        if recorded.is_some() && recorded == std::fs::canonicalize(name).ok() {
            return Ok(());
        }
        Err(self.could_not_open(format!(
            "'{key}' names another file than the image's backing file; vdisk opens the backing \
             file the image names"
        )))
    }

    /// Looks up the `key-secret` of the image among the `--object` definitions; without one, an
    /// encrypted image's passphrase is asked for on the terminal ([`crate::prompt`]).
    pub fn with_secret(mut self, objects: &Objects) -> Result<ImageRef> {
        let lookup = |id: &str| match objects.secret(id) {
            Ok(bytes) => Ok(Passphrase::new(bytes.to_vec())),
            Err(e) => Err(self.could_not_open(e)),
        };
        let secret = self.key_secret.as_deref().map(lookup).transpose()?;
        let backing_secret = self.backing_key_secret.as_deref().map(lookup).transpose()?;
        (self.secret, self.backing_secret) = (secret, backing_secret);
        if self.secret.is_none() {
            // On a terminal vdisk asks for the passphrase no secret names.
            self.secret =
                crate::prompt::passphrase_for(&self.path, self.format.as_deref(), &self.display)?;
        }
        Ok(self)
    }

    /// Opens the image (its backing chain too, unless `no_backing`), with qemu-img's
    /// `Could not open 'FILE': ...` messages.
    pub fn open(&self, read_only: bool, no_backing: bool) -> Result<Arc<dyn BlockDev>> {
        let format = self.format_or_probe(read_only)?;
        self.open_as(format, read_only, no_backing)
    }

    /// Opens the image as `format` (already chosen with [`ImageRef::format_or_probe`]).
    pub fn open_as(
        &self,
        format: Format,
        read_only: bool,
        no_backing: bool,
    ) -> Result<Arc<dyn BlockDev>> {
        let opts = OpenOptions {
            format: Some(format),
            read_only,
            no_backing,
            backing_policy: crate::backing_policy::get(),
        };
        let secrets = vec![self.secret.clone(), self.backing_secret.clone()];
        vdisk_formats::open_with_secrets(&self.path, opts, secrets).map_err(|e| self.open_error(&e))
    }

    /// `Could not open 'FILE': WHY` for an error of opening this image.
    pub fn open_error(&self, e: &vdisk_formats::Error) -> anyhow::Error {
        // Some messages name the file themselves; the phrase around them names it already.
        let why = describe(e);
        let prefix = format!("{}: ", self.path.display());
        self.could_not_open(why.strip_prefix(&prefix).unwrap_or(&why))
    }

    /// The format asked for, or the probed one. Opening a probed raw image for writing prints
    /// qemu-img's warning about writes to block 0.
    pub fn format_or_probe(&self, read_only: bool) -> Result<Format> {
        if let Some(name) = &self.format {
            return parse_driver(name).map_err(|e| self.could_not_open(e.to_string()));
        }
        let format =
            vdisk_formats::probe(&self.path).map_err(|e| self.could_not_open(describe(&e)))?;
        if format == Format::Raw && !read_only {
            eprintln!(
                "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         \
                 Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
                 Specify the 'raw' format explicitly to remove the restrictions.",
                self.display
            );
        }
        Ok(format)
    }

    /// `Could not open 'FILE': WHY`.
    pub fn could_not_open(&self, why: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("Could not open '{}': {why}", self.display)
    }
}

/// The options most commands take to name and open one image: `-f`, `--image-opts`, `-U` and
/// `--object` (flattened into each command's `Args`).
#[derive(clap::Args, Debug)]
pub struct ImageOpts {
    /// Format of the image (raw, qcow2, luks); probed when not given
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,

    /// FILENAME is an option string (driver=qcow2,file.filename=disk.qcow2)
    #[arg(long = "image-opts")]
    pub image_opts: bool,

    /// Open the image in shared mode (accepted; vdisk takes no image locks)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,

    /// A secret: secret,id=ID,data=TEXT or secret,id=ID,file=PATH
    #[arg(long = "object", value_name = "OBJDEF")]
    pub object: Vec<String>,
}

impl ImageOpts {
    /// The image FILENAME names under these options, with its secret looked up.
    pub fn image(&self, filename: &str) -> Result<ImageRef> {
        ImageRef::parse(filename, self.format.as_deref(), self.image_opts)?
            .with_secret(&Objects::parse(&self.object)?)
    }
}

/// One image of a backing chain.
pub struct Layer {
    pub path: PathBuf,
    pub format: Option<String>,
    pub info: NodeInfo,
}

/// The images of the chain under `image`, top first, each described without its backing file.
pub fn chain(image: &ImageRef) -> Result<Vec<Layer>> {
    let top_format = image.format_or_probe(true)?;
    let mut layers: Vec<Layer> = Vec::new();
    let mut next = Some((image.path.clone(), Some(top_format.name().to_string())));
    while let Some((path, format)) = next.take() {
        if layers.len() > vdisk_formats::chain::MAX_CHAIN_DEPTH {
            bail!("Backing chain too deep");
        }
        let parsed = format.as_deref().map(parse_driver).transpose()?;
        let opts = OpenOptions {
            format: parsed,
            read_only: true,
            no_backing: true,
            backing_policy: crate::backing_policy::get(),
        };
        // The top image and its backing file can be encrypted, with the secrets given for them.
        let secret = match layers.len() {
            0 => image.secret.as_ref(),
            1 => image.backing_secret.as_ref(),
            _ => None,
        };
        let dev = vdisk_formats::open_with_secret(&path, opts, secret)
            .map_err(|e| anyhow!("Could not open '{}': {}", path.display(), describe(&e)))?;
        let info = dev.info().map_err(|e| anyhow!(describe(&e)))?;
        if let Some(b) = &info.backing {
            crate::backing_policy::get()
                .check_backing(&path, &b.filename, b.format.as_deref())
                .map_err(|e| anyhow!("Could not open '{}': {}", path.display(), describe(&e)))?;
        }
        next = info
            .backing
            .as_ref()
            .map(|b| (PathBuf::from(&b.full_filename), b.format.clone()));
        layers.push(Layer { path, format, info });
    }
    Ok(layers)
}

/// The files of a chain read as plain files, to tell which parts of a layer's data clusters are
/// holes in the host file. QEMU reports those (and what lies past the end of the file) as
/// reading zero, and `map` and `measure` show it, for qcow2 layers only when it guesses that
/// they were made with metadata preallocation ([`vdisk_formats::qcow2::metadata_prealloc`]).
pub struct HostFiles {
    paths: Vec<PathBuf>,
    formats: Vec<String>,
    files: Vec<Option<Arc<dyn BlockDev>>>,
    /// Whether the holes of each layer's file count, once known.
    holes_count: Vec<Option<bool>>,
}

impl HostFiles {
    pub fn new(layers: &[Layer]) -> HostFiles {
        HostFiles {
            paths: layers.iter().map(|l| l.path.clone()).collect(),
            formats: layers.iter().map(|l| l.info.format.clone()).collect(),
            files: layers.iter().map(|_| None).collect(),
            holes_count: layers.iter().map(|_| None).collect(),
        }
    }

    /// Whether QEMU looks at the host file of layer `d` for holes.
    fn holes_count(&mut self, d: usize) -> Result<bool> {
        if let Some(known) = self.holes_count[d] {
            return Ok(known);
        }
        let known = if self.formats[d] == "qcow2" {
            vdisk_formats::qcow2::metadata_prealloc::metadata_preallocated(&self.paths[d])
                .map_err(|e| anyhow!(describe(&e)))?
        } else {
            true
        };
        self.holes_count[d] = Some(known);
        Ok(known)
    }

    /// How many bytes from `host` (at most `len`) in the file of layer `depth` share one state,
    /// and whether they are a hole (or past the end of the file) that reads as zero.
    pub fn run(&mut self, depth: u32, host: u64, len: u64) -> Result<(u64, bool)> {
        let d = depth as usize;
        if !self.holes_count(d)? {
            return Ok((len, false));
        }
        if self.files[d].is_none() {
            let opts = OpenOptions {
                format: Some(Format::Raw),
                read_only: true,
                no_backing: true,
                backing_policy: crate::backing_policy::get(),
            };
            let dev =
                vdisk_formats::open(&self.paths[d], opts).map_err(|e| anyhow!(describe(&e)))?;
            self.files[d] = Some(dev);
        }
        let file = self.files[d].as_ref().expect("opened above");
        if host >= file.size() {
            return Ok((len, true));
        }
        let e = file
            .extent(host, len.min(file.size() - host))
            .map_err(|e| anyhow!(describe(&e)))?;
        Ok((e.length, e.kind != vdisk_formats::ExtentKind::Data))
    }
}

/// An image as it was when one of its internal snapshots was taken (`-l`): a temporary copy of
/// the image, beside it, reverted to the snapshot. The qcow2 driver has no read-only view of a
/// snapshot yet, so this costs a copy of the file. The copy is removed when dropped.
pub struct SnapshotCopy {
    pub image: ImageRef,
}

impl SnapshotCopy {
    /// `spec` is `snapshot.id=ID`, `snapshot.name=NAME`, or an id or name.
    pub fn new(image: &ImageRef, spec: &str) -> Result<SnapshotCopy> {
        let format = image.format_or_probe(true)?;
        if format != Format::Qcow2 {
            bail!(
                "Failed to load snapshot: Block format '{format}' used by device '' does not \
                 support temporarily loading internal snapshots"
            );
        }
        let (mut id, mut name) = (None, None);
        if spec.starts_with("snapshot.") {
            for (k, v) in parse_lists(&[spec.to_string()])?.pairs {
                match k.as_str() {
                    "snapshot.id" => id = Some(v),
                    "snapshot.name" => name = Some(v),
                    _ => bail!("Invalid parameter '{k}'"),
                }
            }
        } else {
            id = Some(spec.to_string());
        }
        let list = vdisk_formats::qcow2::snapshot::list(&image.path)
            .map_err(|e| image.could_not_open(describe(&e)))?;
        let found = list.iter().find(|s| {
            let id_ok = id.as_ref().is_none_or(|i| s.id == *i);
            let name_ok = name.as_ref().is_none_or(|n| s.name == *n);
            (id_ok && name_ok) || (name.is_none() && id.as_ref() == Some(&s.name))
        });
        let Some(found) = found else {
            bail!("Failed to load snapshot: Can't find snapshot");
        };
        let file_name = image
            .path
            .file_name()
            .map_or("image".into(), |n| n.to_string_lossy());
        let copy = image.path.with_file_name(format!(
            ".{file_name}.vdisk-snapshot-{}",
            std::process::id()
        ));
        let snapshot = SnapshotCopy {
            image: ImageRef {
                path: copy.clone(),
                format: Some(format.name().to_string()),
                ..image.clone()
            },
        };
        std::fs::copy(&image.path, &copy)
            .map_err(|e| anyhow!("Failed to load snapshot: {}", crate::errors::os_message(&e)))?;
        vdisk_formats::qcow2::snapshot::apply(&copy, &found.id)
            .map_err(|e| anyhow!("Failed to load snapshot: {}", describe(&e)))?;
        Ok(snapshot)
    }
}

impl Drop for SnapshotCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.image.path);
    }
}

/// Gives a new encrypted image (LUKS, or qcow2 with `encrypt.format=luks`) the passphrase its
/// `key-secret` option names.
pub fn resolve_create_secret(mut opts: CreateOptions, objects: &Objects) -> Result<CreateOptions> {
    let (luks, option) = match &mut opts {
        CreateOptions::Luks(o) => (o, "key-secret"),
        CreateOptions::Qcow2(q) => match q.encrypt.as_mut() {
            Some(o) => (o, "encrypt.key-secret"),
            None => return Ok(opts),
        },
        _ => return Ok(opts),
    };
    let Some(id) = luks.key_secret.clone() else {
        bail!("Parameter '{option}' is required for cipher");
    };
    luks.passphrase = Some(Passphrase::new(objects.secret(&id)?.to_vec()));
    Ok(opts)
}

/// The passphrase [`resolve_create_secret`] gave a new encrypted image, to open it with.
pub fn create_passphrase(opts: &CreateOptions) -> Option<Passphrase> {
    match opts {
        CreateOptions::Luks(o) => o.passphrase.clone(),
        CreateOptions::Qcow2(q) => q.encrypt.as_ref().and_then(|o| o.passphrase.clone()),
        _ => None,
    }
}

/// A format name as `-f` or `driver=` takes it, with the message qemu gives for unknown ones.
pub fn parse_driver(name: &str) -> Result<Format> {
    Format::from_name(name).map_err(|_| anyhow!("Unknown driver '{name}'"))
}

/// A target format name as `-O` takes it.
pub fn parse_target_format(name: &str) -> Result<Format> {
    Format::from_name(name).map_err(|_| anyhow!("Unknown file format '{name}'"))
}

/// Checks a `-t`/`-T` cache mode; vdisk always goes through the host page cache, so a valid mode
/// changes nothing. `which` is `""`, `"source "` or `"backing "` as the message needs.
pub fn check_cache_mode(mode: Option<&str>, which: &str) -> Result<()> {
    match mode {
        None | Some("none" | "writeback" | "writethrough" | "directsync" | "unsafe") => Ok(()),
        Some(other) => bail!("Invalid {which}cache option: {other}"),
    }
}

/// `--output human|json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Human,
    Json,
}

impl Output {
    /// Reads `--output` for `command`, with qemu-img's usage error for other values.
    pub fn parse(text: Option<&str>, command: &'static str) -> Result<Output> {
        match text {
            None | Some("human") => Ok(Output::Human),
            Some("json") => Ok(Output::Json),
            Some(other) => Err(UsageError::error(
                command,
                format!("--output expects 'human' or 'json' not '{other}'"),
            )),
        }
    }
}

/// The path a relative backing name stands for, seen from the image that stores it.
pub fn backing_path(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// The members of a `json:` file name as dotted option keys (`{"file": {"filename": "x"}}` is
/// `file.filename=x`), as QEMU flattens them; the error is QEMU's.
fn json_pairs(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        let why = if e.is_eof() {
            "premature EOI".to_string()
        } else {
            e.to_string()
        };
        format!("Could not parse the JSON options: JSON parse error, {why}")
    })?;
    let serde_json::Value::Object(members) = value else {
        return Err("Invalid JSON object given".into());
    };
    let mut pairs = Vec::new();
    flatten_json("", &members, &mut pairs)?;
    Ok(pairs)
}

fn flatten_json(
    prefix: &str,
    members: &serde_json::Map<String, serde_json::Value>,
    out: &mut Vec<(String, String)>,
) -> std::result::Result<(), String> {
    for (key, value) in members {
        let key = format!("{prefix}{key}");
        match value {
            serde_json::Value::Object(inner) => flatten_json(&format!("{key}."), inner, out)?,
            serde_json::Value::String(text) => out.push((key, text.clone())),
            serde_json::Value::Number(_) | serde_json::Value::Bool(_) => {
                out.push((key, value.to_string()))
            }
            _ => return Err(format!("Invalid value for option '{key}'")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_opts_name_the_file_and_the_driver() {
        let r = ImageRef::parse("driver=qcow2,file.filename=a,,b.qcow2", None, true).unwrap();
        assert_eq!(r.path, Path::new("a,b.qcow2"));
        assert_eq!(r.format.as_deref(), Some("qcow2"));
        let err = ImageRef::parse("disk.img", None, true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Could not open 'disk.img': Cannot find device='disk.img' nor node-name='disk.img'"
        );
        let err = ImageRef::parse("file.filename=x,foo=1", None, true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Could not open 'file.filename=x,foo=1': Block format 'raw' does not support the option 'foo'"
        );
        let err = ImageRef::parse("driver=raw,file.filename=x", Some("raw"), true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--image-opts and --format are mutually exclusive"
        );
    }
}
