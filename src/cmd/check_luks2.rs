//! `vdisk check` of a LUKS2 image: its two header copies. qemu-img cannot open LUKS2 (QEMU has
//! LUKS1 only, whose single header has nothing to cross-check), so this check is vdisk's own,
//! worded and scored as qemu-img's qcow2 check is: a damaged or stale copy is a corruption (exit
//! 2), and `-r all` rewrites it from the good copy.

use anyhow::{anyhow, Result};
use serde_json::{json, Value};
use vdisk_formats::luks::Luks;
use vdisk_formats::qcow2::check::Repair;
use vdisk_formats::{Format, FormatSpecific};

use crate::errors::{describe, Exit};
use crate::image_args::{ImageRef, Output};
use crate::output::qemu_json;

/// Checks (and with `-r all` repairs) a LUKS2 image; `None` when the image is LUKS1.
pub fn check(
    image: &ImageRef,
    repair: Option<Repair>,
    output: Output,
    quiet: bool,
) -> Result<Option<()>> {
    let Some(damage) = luks2_damage(image)? else {
        return Ok(None);
    };
    let report = |corruptions: u32, fixed: u32| {
        if quiet {
            return;
        }
        match output {
            Output::Json => {
                let mut v = json!({
                    "check-errors": 0,
                    "filename": image.display,
                    "format": "luks",
                });
                if corruptions > 0 {
                    v["corruptions"] = Value::from(corruptions);
                }
                if fixed > 0 {
                    v["corruptions-fixed"] = Value::from(fixed);
                }
                println!("{}", qemu_json(&v));
            }
            Output::Human if corruptions > 0 => println!(
                "\n{corruptions} errors were found on the image.\n\
                 Data may be corrupted, or further writes to the image may corrupt it."
            ),
            Output::Human if fixed > 0 => println!(
                "The following inconsistencies were found and repaired:\n\n    \
                 0 leaked clusters\n    {fixed} corruptions\n\n\
                 Double checking the fixed image now...\nNo errors were found on the image."
            ),
            Output::Human => println!("No errors were found on the image."),
        }
    };
    let Some(why) = damage else {
        report(0, 0);
        return Ok(Some(()));
    };
    if repair != Some(Repair::All) {
        eprintln!("ERROR {why}");
        report(1, 0);
        return Err(Exit::silently(2));
    }
    let secret = image
        .secret
        .as_ref()
        .ok_or_else(|| image.could_not_open("Parameter 'key-secret' is required for cipher"))?;
    let luks = Luks::open(&image.path, false, secret).map_err(|e| image.open_error(&e))?;
    eprintln!("Repairing the LUKS2 header copy: {why}");
    luks.repair().map_err(|e| anyhow!(describe(&e)))?;
    drop(luks);
    if let Some(Some(still)) = luks2_damage(image)? {
        return Err(Exit::with(2, format!("the repair did not take: {still}")));
    }
    report(0, 1);
    Ok(Some(()))
}

/// `None` for LUKS1; for LUKS2, what is wrong with one of its header copies, if anything. Read
/// from the headers alone, with no passphrase.
fn luks2_damage(image: &ImageRef) -> Result<Option<Option<String>>> {
    let info = vdisk_formats::describe(&image.path, Some(Format::Luks))
        .map_err(|e| image.could_not_open(describe(&e)))?;
    Ok(match info.format_specific {
        Some(FormatSpecific::Luks(l)) => l.luks2.map(|v2| v2.damaged_header),
        _ => None,
    })
}
