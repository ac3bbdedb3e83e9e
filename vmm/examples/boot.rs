//! A bare-bones `vdisk boot`: the calls the CLI makes, without its argument parser.
//!
//! ```text
//! cargo run -p vdisk-vmm --example boot -- KERNEL [--initrd FILE] [--append CMDLINE]
//!     [--disk IMAGE[,format=F][,readonly=on]]... [--memory 512M] [--cpus N] [--serial stdio|FILE|none]
//! ```

use std::process::ExitCode;

use vdisk_vmm::{parse_memory, DiskSpec, SerialConfig, Vm, VmConfig};

fn run() -> vdisk_vmm::Result<vdisk_vmm::ExitReason> {
    let mut args = std::env::args().skip(1);
    let kernel = args
        .next()
        .ok_or_else(|| vdisk_vmm::Error::Config("usage: boot KERNEL [options]".into()))?;
    let mut cfg = VmConfig::new(kernel);
    let mut disks = Vec::new();
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| vdisk_vmm::Error::Config(format!("{flag} needs a value")))?;
        match flag.as_str() {
            "--initrd" => cfg.initrd = Some(value.into()),
            "--append" => cfg.cmdline = value,
            "--disk" => disks.push(DiskSpec::parse(&value)?),
            "--memory" => cfg.memory = parse_memory(&value)?,
            "--cpus" => {
                cfg.cpus = value
                    .parse()
                    .map_err(|_| vdisk_vmm::Error::Config(format!("bad --cpus {value}")))?
            }
            "--serial" => cfg.serial = SerialConfig::parse(&value)?,
            other => return Err(vdisk_vmm::Error::Config(format!("unknown option {other}"))),
        }
    }
    for (i, spec) in disks.iter().enumerate() {
        cfg.disks.push(spec.open(i)?);
    }
    Vm::new(cfg)?.run()
}

fn main() -> ExitCode {
    match run() {
        Ok(reason) => {
            eprintln!("vdisk boot: guest stopped: {reason:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            // The whole chain, as the CLI prints it with anyhow's {:#}.
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("vdisk boot: {msg}");
            ExitCode::FAILURE
        }
    }
}
