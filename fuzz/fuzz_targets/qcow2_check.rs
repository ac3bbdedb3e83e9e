//! `vdisk check` on arbitrary bytes: the input is a qcow2 image file. It is checked read-only
//! (which must not change the file), then repaired with `-r all` on its own copy, and the
//! repaired copy checked again. Reports are rendered as the CLI prints them.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vdisk_formats::qcow2::check::Repair;
use vdisk_formats::qcow2::Qcow2;

fuzz_target!(|data: &[u8]| {
    let file = vdisk_fuzz::image_file(data);
    let path = file.path();
    let Ok(report) = Qcow2::check(path, None) else {
        return;
    };
    let _ = (report.human(), report.json_fields(), report.exit_code());
    let after = std::fs::read(path).expect("read the checked image back");
    assert!(after == data, "a read-only check changed the image");

    let copy = vdisk_fuzz::image_file(data);
    if let Ok(report) = Qcow2::check(copy.path(), Some(Repair::All)) {
        let _ = (report.human(), report.exit_code());
        if let Ok(again) = Qcow2::check(copy.path(), None) {
            let _ = again.human();
        }
    }
});
