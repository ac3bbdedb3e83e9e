//! The qemu-img command set, case by case, against qemu-img 10.0 (the oracle).
//!
//! Every case runs three times on fresh copies of the same fixture images: through the real
//! `qemu-img`, through `vdisk`, and through a `qemu-img` symlink to the vdisk binary (the drop-in
//! personality). The runs must agree on the exit status and stdout (JSON parsed, progress lines
//! dropped); the symlink run must also print the same stderr as qemu-img (program names
//! normalised); the images each run leaves behind must have the same size and read the same
//! (`qemu-img compare`), and follow-up `qemu-img` commands on them must print the same.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use common::Outcome;
use serde_json::Value;

/// How a case's stdout is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    /// Byte for byte (after dropping progress output).
    Text,
    /// Parsed as JSON.
    Json,
}

#[derive(Debug)]
struct Case {
    /// Arguments after the program name; run in the case's directory.
    args: &'static [&'static str],
    /// qemu-img commands run first (in every run's directory).
    prep: &'static [&'static [&'static str]],
    /// Images the command creates or changes, compared between the runs afterwards.
    outputs: &'static [&'static str],
    /// qemu-img commands run afterwards; their stdout must agree (JSON without `actual-size`).
    post: &'static [&'static [&'static str]],
    stdout: Out,
    /// Where the command puts new metadata is its own choice (bitmaps are stored in new
    /// clusters): `post` output is compared without the image end offset and file length.
    any_layout: bool,
}

const C: Case = Case {
    args: &[],
    prep: &[],
    outputs: &[],
    post: &[],
    stdout: Out::Text,
    any_layout: false,
};

#[rustfmt::skip]
const CASES: &[Case] = &[
    // --- the seed tutorial, then create ---------------------------------------------------------
    Case { args: &["create", "-f", "raw", "example", "10G"], outputs: &["example"], ..C },
    Case { args: &["info", "example"], prep: &[&["create", "-q", "-f", "raw", "example", "10G"]], ..C },
    Case { args: &["create", "-f", "qcow2", "new.qcow2", "64M"], outputs: &["new.qcow2"], post: &[&["info", "--output=json", "new.qcow2"]], ..C },
    Case { args: &["create", "-f", "qcow2", "-o", "cluster_size=4k,lazy_refcounts=on", "new.qcow2", "1G"], outputs: &["new.qcow2"], ..C },
    Case { args: &["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2"], outputs: &["ov.qcow2"], post: &[&["info", "--output=json", "ov.qcow2"]], ..C },
    Case { args: &["create", "-f", "qcow2", "-b", "base.qcow2", "ov.qcow2"], ..C },
    Case { args: &["create", "-f", "qcow2", "-u", "-b", "nope", "-F", "qcow2", "ov.qcow2", "1M"], outputs: &["ov.qcow2"], ..C },
    Case { args: &["create", "-f", "qcow2", "-b", "nope", "-F", "qcow2", "ov.qcow2"], ..C },
    Case { args: &["create", "-f", "raw", "bad.img", "1X"], ..C },
    Case { args: &["create", "-f", "foo", "x.img", "1M"], ..C },
    // --- info ---------------------------------------------------------------------------------------
    Case { args: &["info", "q.qcow2"], ..C },
    Case { args: &["info", "--output=json", "q.qcow2"], stdout: Out::Json, ..C },
    Case { args: &["info", "--backing-chain", "top.qcow2"], ..C },
    Case { args: &["info", "snap.qcow2"], ..C },
    Case { args: &["info", "--output=json", "snap.qcow2"], stdout: Out::Json, ..C },
    Case { args: &["info", "missing.img"], ..C },
    Case { args: &["info", "-f", "qcow2", "raw.img"], ..C },
    Case { args: &["info"], ..C },
    // --- convert ------------------------------------------------------------------------------------
    Case { args: &["convert", "-O", "qcow2", "raw.img", "out.qcow2"], outputs: &["out.qcow2"], post: &[&["check", "out.qcow2"]], ..C },
    Case { args: &["convert", "-f", "qcow2", "-O", "raw", "q.qcow2", "out.raw"], outputs: &["out.raw"], ..C },
    Case { args: &["convert", "-c", "-O", "qcow2", "raw.img", "out.qcow2"], outputs: &["out.qcow2"], post: &[&["check", "out.qcow2"]], ..C },
    Case { args: &["convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", "raw.img", "out.qcow2"], outputs: &["out.qcow2"], post: &[&["info", "--output=json", "out.qcow2"]], ..C },
    Case { args: &["convert", "-O", "qcow2", "-o", "cluster_size=4k,compat=0.10", "raw.img", "out.qcow2"], outputs: &["out.qcow2"], ..C },
    Case { args: &["convert", "-O", "raw", "raw.img", "small.raw", "out.raw"], outputs: &["out.raw"], ..C },
    Case { args: &["convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "out.qcow2"], outputs: &["out.qcow2"], ..C },
    Case { args: &["convert", "-O", "qcow2", "top.qcow2", "out.qcow2"], outputs: &["out.qcow2"], ..C },
    Case { args: &["convert", "-n", "-O", "raw", "raw.img", "target.raw"], prep: &[&["create", "-q", "-f", "raw", "target.raw", "16M"]], outputs: &["target.raw"], ..C },
    Case { args: &["convert", "-n", "--target-is-zero", "-f", "raw", "-O", "raw", "raw.img", "target.raw"], prep: &[&["create", "-q", "-f", "raw", "target.raw", "8M"]], outputs: &["target.raw"], ..C },
    Case { args: &["convert", "-S", "0", "-O", "raw", "q.qcow2", "out.raw"], outputs: &["out.raw"], ..C },
    Case { args: &["convert", "-m", "4", "-W", "-O", "qcow2", "raw.img", "out.qcow2"], outputs: &["out.qcow2"], ..C },
    Case { args: &["convert", "-p", "-O", "qcow2", "raw.img", "out.qcow2"], outputs: &["out.qcow2"], ..C },
    Case { args: &["convert", "-C", "-O", "raw", "raw.img", "out.raw"], outputs: &["out.raw"], ..C },
    Case { args: &["convert", "-C", "-O", "raw", "q.qcow2", "out.raw"], outputs: &["out.raw"], ..C },
    Case { args: &["convert", "-C", "-O", "qcow2", "raw.img", "out.qcow2"], outputs: &["out.qcow2"], post: &[&["check", "out.qcow2"]], ..C },
    Case { args: &["convert", "-C", "-m", "2", "-W", "-O", "raw", "-f", "raw", "raw.img", "out.raw"], outputs: &["out.raw"], ..C },
    Case { args: &["convert", "-C", "-c", "-O", "qcow2", "raw.img", "out.qcow2"], ..C },
    Case { args: &["convert", "-C", "-S", "4k", "-O", "raw", "raw.img", "out.raw"], ..C },
    Case { args: &["convert", "-C", "--salvage", "-O", "raw", "raw.img", "out.raw"], ..C },
    Case { args: &["convert", "-r", "64M", "-O", "qcow2", "q.qcow2", "out.qcow2"], outputs: &["out.qcow2"], post: &[&["check", "out.qcow2"]], ..C },
    Case { args: &["convert", "-r", "0", "-O", "raw", "raw.img", "out.raw"], outputs: &["out.raw"], ..C },
    Case { args: &["convert", "-r", "1X", "-O", "raw", "raw.img", "out.raw"], ..C },
    Case { args: &["convert", "-r", "-1", "-O", "raw", "raw.img", "out.raw"], ..C },
    Case { args: &["convert", "missing.img", "out.raw"], ..C },
    Case { args: &["convert", "-O", "foo", "raw.img", "out"], ..C },
    Case { args: &["convert", "-c", "-O", "raw", "raw.img", "out"], ..C },
    Case { args: &["convert", "-S", "100", "raw.img", "out"], ..C },
    Case { args: &["convert", "-m", "0", "raw.img", "out"], ..C },
    Case { args: &["convert", "raw.img"], ..C },
    Case { args: &["convert", "-n", "-f", "raw", "-O", "raw", "raw.img", "small.raw"], ..C },
    Case { args: &["convert", "--target-is-zero", "raw.img", "out"], ..C },
    Case { args: &["convert", "-O", "qcow2", "-o", "foo=1", "raw.img", "out"], ..C },
    Case { args: &["convert", "-O", "qcow2", "-B", "base.qcow2", "top.qcow2", "out"], ..C },
    Case { args: &["convert", "-Z", "raw.img", "out"], ..C },
    Case { args: &["convert", "-l", "s1", "-O", "raw", "snap.qcow2", "out.raw"], outputs: &["out.raw", "snap.qcow2"], ..C },
    Case { args: &["convert", "-l", "snapshot.id=1", "-O", "qcow2", "snap.qcow2", "out.qcow2"], outputs: &["out.qcow2"], ..C },
    Case { args: &["convert", "-l", "nope", "-O", "raw", "snap.qcow2", "out.raw"], ..C },
    Case { args: &["measure", "-l", "s1", "-O", "qcow2", "snap.qcow2"], ..C },
    // --- map --------------------------------------------------------------------------------------------
    Case { args: &["map", "q.qcow2"], ..C },
    Case { args: &["map", "--output=json", "q.qcow2"], stdout: Out::Json, ..C },
    Case { args: &["map", "-f", "raw", "raw.img"], ..C },
    Case { args: &["map", "--output=json", "top.qcow2"], stdout: Out::Json, ..C },
    Case { args: &["map", "--output=json", "--start-offset", "1M", "--max-length", "2M", "top.qcow2"], stdout: Out::Json, ..C },
    Case { args: &["map", "top.qcow2"], ..C },
    Case { args: &["map", "--output=foo", "raw.img"], ..C },
    Case { args: &["map", "--start-offset", "1X", "raw.img"], ..C },
    Case { args: &["map", "missing.img"], ..C },
    Case { args: &["map", "pm.qcow2"], prep: &[PREALLOC_METADATA], ..C },
    Case { args: &["map", "--output=json", "pm.qcow2"], prep: &[PREALLOC_METADATA], stdout: Out::Json, ..C },
    Case { args: &["measure", "-O", "qcow2", "pm.qcow2"], prep: &[PREALLOC_METADATA], ..C },
    Case { args: &["map", "pf.qcow2"], prep: &[PREALLOC_FALLOC], ..C },
    Case { args: &["map", "--output=json", "pf.qcow2"], prep: &[PREALLOC_FALLOC], stdout: Out::Json, ..C },
    Case { args: &["measure", "-O", "qcow2", "pf.qcow2"], prep: &[PREALLOC_FALLOC], ..C },
    Case { args: &["measure", "--output=json", "-O", "raw", "pf.qcow2"], prep: &[PREALLOC_FALLOC], stdout: Out::Json, ..C },
    // --- compare ----------------------------------------------------------------------------------------
    Case { args: &["compare", "raw.img", "raw.img"], ..C },
    Case { args: &["compare", "raw.img", "q.qcow2"], ..C },
    Case { args: &["compare", "-s", "raw.img", "small.raw"], ..C },
    Case { args: &["compare", "raw.img", "small.raw"], ..C },
    Case { args: &["compare", "-s", "q.qcow2", "q.qcow2"], ..C },
    Case { args: &["compare", "-f", "raw", "-F", "qcow2", "raw.img", "raw.img"], ..C },
    Case { args: &["compare", "top.qcow2", "flat.raw"], prep: &[&["convert", "-O", "raw", "top.qcow2", "flat.raw"]], ..C },
    Case { args: &["compare", "missing.img", "raw.img"], ..C },
    Case { args: &["compare", "raw.img"], ..C },
    // --- check ------------------------------------------------------------------------------------------
    Case { args: &["check", "q.qcow2"], ..C },
    Case { args: &["check", "--output=json", "q.qcow2"], stdout: Out::Json, ..C },
    Case { args: &["check", "raw.img"], ..C },
    Case { args: &["check", "-r", "all", "q.qcow2"], outputs: &["q.qcow2"], ..C },
    Case { args: &["check", "-f", "qcow2", "raw.img"], ..C },
    Case { args: &["check", "-r", "foo", "q.qcow2"], ..C },
    Case { args: &["check", "missing.img"], ..C },
    // --- resize -----------------------------------------------------------------------------------------
    Case { args: &["resize", "-f", "raw", "raw.img", "+1M"], outputs: &["raw.img"], ..C },
    Case { args: &["resize", "q.qcow2", "16M"], outputs: &["q.qcow2"], post: &[&["check", "q.qcow2"]], ..C },
    Case { args: &["resize", "q.qcow2", "4M"], outputs: &["q.qcow2"], ..C },
    Case { args: &["resize", "--shrink", "-f", "qcow2", "q.qcow2", "7M"], outputs: &["q.qcow2"], post: &[&["check", "q.qcow2"]], ..C },
    Case { args: &["resize", "--object", "secret,id=s0,data=pw", "--image-opts", ENC_QCOW2_IMAGE, "16M"], outputs: &["enc.qcow2"], post: &[ENC_CHECK], ..C },
    Case { args: &["resize", "enc.qcow2", "16M"], ..C },
    Case { args: &["resize", "--object", "secret,id=s0,data=pw", "--image-opts", LUKS_IMAGE, "+1M"], outputs: &["l.luks"], post: &[&["info", "--output=json", "l.luks"], LUKS_IS_RAW_IMG], ..C },
    Case { args: &["resize", "--shrink", "--object", "secret,id=s0,data=pw", "--image-opts", LUKS_IMAGE, "4M"], outputs: &["l.luks"], post: &[&["info", "l.luks"], LUKS_IS_RAW_IMG], ..C },
    Case { args: &["resize", "--shrink", "-q", "--object", "secret,id=s0,data=pw", "--image-opts", LUKS_IMAGE, "5000"], outputs: &["l.luks"], post: &[&["info", "l.luks"]], ..C },
    Case { args: &["resize", "--preallocation=full", "--object", "secret,id=s0,data=pw", "--image-opts", LUKS_IMAGE, "12M"], outputs: &["l.luks"], post: &[&["info", "l.luks"]], ..C },
    Case { args: &["resize", "--preallocation=falloc", "--object", "secret,id=s0,data=pw", "--image-opts", LUKS_IMAGE, "+64k"], outputs: &["l.luks"], post: &[&["info", "l.luks"]], ..C },
    Case { args: &["resize", "--preallocation=metadata", "--object", "secret,id=s0,data=pw", "--image-opts", LUKS_IMAGE, "12M"], ..C },
    Case { args: &["resize", "--object", "secret,id=s0,data=pw", "--image-opts", LUKS_IMAGE, "4M"], ..C },
    Case { args: &["resize", "--object", "secret,id=s0,data=wrong", "--image-opts", LUKS_IMAGE, "+1M"], ..C },
    Case { args: &["resize", "l.luks", "+1M"], ..C },
    Case { args: &["resize", "-f", "raw", "raw.img", "1X"], ..C },
    Case { args: &["resize", "-f", "raw", "raw.img"], ..C },
    // --- measure ----------------------------------------------------------------------------------------
    Case { args: &["measure", "-O", "qcow2", "--size", "10G"], ..C },
    Case { args: &["measure", "--output=json", "-O", "qcow2", "raw.img"], stdout: Out::Json, ..C },
    Case { args: &["measure", "-O", "qcow2", "-o", "cluster_size=4k", "raw.img"], ..C },
    Case { args: &["measure", "-O", "qcow2", "base.qcow2"], ..C },
    Case { args: &["measure", "-O", "qcow2", "-o", "cluster_size=4k", "q.qcow2"], ..C },
    Case { args: &["measure", "-O", "raw", "top.qcow2"], ..C },
    Case { args: &["measure"], ..C },
    Case { args: &["measure", "-O", "qcow2", "-o", "foo=1", "--size", "1M"], ..C },
    Case { args: &["measure", "--object", "secret,id=s0,data=pw", "-O", "luks", "-o", "key-secret=s0", "--size", "1G"], ..C },
    Case { args: &["measure", "--object", "secret,id=s0,data=pw", "-O", "luks", "-o", "key-secret=s0,iter-time=1,cipher-alg=aes-128,preallocation=full", "--size", "1000"], ..C },
    Case { args: &["measure", "--object", "secret,id=s0,data=pw", "-O", "luks", "-o", "key-secret=s0,iter-time=1,cipher-alg=twofish-256,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=md5", "--size", "1M"], ..C },
    Case { args: &["measure", "--output=json", "--object", "secret,id=s0,data=pw", "-O", "luks", "-o", "key-secret=s0", "raw.img"], stdout: Out::Json, ..C },
    Case { args: &["measure", "--object", "secret,id=s0,data=pw", "-O", "luks", "-o", "key-secret=s0", "--image-opts", LUKS_IMAGE], ..C },
    Case { args: &["measure", "--object", "secret,id=s0,data=pw", "--image-opts", LUKS_IMAGE], ..C },
    Case { args: &["measure", "--output=json", "--object", "secret,id=s0,data=pw", "-O", "qcow2", "--image-opts", LUKS_IMAGE], stdout: Out::Json, ..C },
    Case { args: &["measure", "--object", "secret,id=s0,data=pw", "-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,cluster_size=4k", "q.qcow2"], ..C },
    Case { args: &["measure", "--output=json", "--object", "secret,id=s0,data=pw", "-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-alg=aes-128", "--size", "1G"], stdout: Out::Json, ..C },
    Case { args: &["measure", "-O", "qcow2", "-o", "encrypt.format=luks", "--size", "1G"], ..C },
    Case { args: &["measure", "-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-mode=bad", "--size", "1G"], ..C },
    Case { args: &["measure", "-O", "luks", "--size", "1G"], ..C },
    Case { args: &["measure", "-O", "luks", "-o", "key-secret=s0", "raw.img"], ..C },
    Case { args: &["measure", "-O", "luks", "-o", "detached-header=on", "--size", "1G"], ..C },
    Case { args: &["measure", "-O", "luks", "-o", "iter-time=x", "--size", "1G"], ..C },
    Case { args: &["measure", "--object", "secret,id=s0,data=pw", "-O", "luks", "-o", "key-secret=s0,iter-time=1,cipher-alg=cast5-128", "--size", "1M"], ..C },
    Case { args: &["measure", "--object", "secret,id=s0,data=pw", "-O", "luks", "-o", "key-secret=s0,cipher-alg=aes-128,ivgen-alg=essiv,ivgen-hash-alg=sha512", "--size", "1M"], ..C },
    Case { args: &["measure", "-O", "luks", "l.luks"], ..C },
    // --- dd ---------------------------------------------------------------------------------------------
    Case { args: &["dd", "if=raw.img", "of=out.raw", "bs=64k", "count=20", "skip=2"], outputs: &["out.raw"], ..C },
    Case { args: &["dd", "-O", "qcow2", "if=q.qcow2", "of=out.qcow2", "bs=1M"], outputs: &["out.qcow2"], ..C },
    Case { args: &["dd", "if=raw.img", "of=out.raw", "foo=1"], ..C },
    Case { args: &["dd", "if=raw.img"], ..C },
    // --- snapshot ---------------------------------------------------------------------------------------
    Case { args: &["snapshot", "-l", "snap.qcow2"], ..C },
    Case { args: &["snapshot", "-a", "s1", "snap.qcow2"], outputs: &["snap.qcow2"], post: &[&["check", "snap.qcow2"]], ..C },
    Case { args: &["snapshot", "-d", "s1", "snap.qcow2"], outputs: &["snap.qcow2"], post: &[&["snapshot", "-l", "snap.qcow2"], &["check", "snap.qcow2"]], ..C },
    Case { args: &["snapshot", "-c", "s2", "q.qcow2"], outputs: &["q.qcow2"], post: &[&["check", "q.qcow2"]], ..C },
    Case { args: &["snapshot", "-a", "nope", "snap.qcow2"], ..C },
    Case { args: &["snapshot", "-l", "-c", "x", "snap.qcow2"], ..C },
    // --- commit -----------------------------------------------------------------------------------------
    Case { args: &["commit", "top.qcow2"], outputs: &["top.qcow2", "base.qcow2"], post: &[&["map", "--output=json", "top.qcow2"], &["check", "base.qcow2"]], ..C },
    Case { args: &["commit", "-d", "top.qcow2"], outputs: &["top.qcow2", "base.qcow2"], ..C },
    Case { args: &["commit", "-b", "nope", "top.qcow2"], ..C },
    Case { args: &["commit", "q.qcow2"], ..C },
    Case { args: &["commit", "top.qcow2"], prep: &[&["snapshot", "-c", "s1", "top.qcow2"], &["convert", "-O", "raw", "top.qcow2", "before.raw"]], outputs: &["top.qcow2", "base.qcow2"], post: &[&["map", "--output=json", "top.qcow2"], &["check", "top.qcow2"], &["check", "base.qcow2"], &["compare", "top.qcow2", "before.raw"], &["convert", "-l", "s1", "-O", "raw", "top.qcow2", "s1.raw"], &["compare", "s1.raw", "before.raw"]], ..C },
    Case { args: &["commit", "xt.qcow2"], prep: &[&["convert", "-O", "qcow2", "-o", "extended_l2=on", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "xt.qcow2"], &["snapshot", "-c", "s1", "xt.qcow2"]], outputs: &["xt.qcow2", "base.qcow2"], post: &[&["map", "--output=json", "xt.qcow2"], &["check", "xt.qcow2"], &["check", "base.qcow2"], &["compare", "xt.qcow2", "top.qcow2"]], ..C },
    Case { args: &["commit", "top.qcow2"], prep: &[&["bitmap", "--add", "top.qcow2", "b0"]], outputs: &["top.qcow2", "base.qcow2"], post: &[&["map", "--output=json", "top.qcow2"], &["check", "top.qcow2"], &["info", "--output=json", "top.qcow2"]], ..C },
    // --- rebase -----------------------------------------------------------------------------------------
    Case { args: &["rebase", "-b", "newbase.qcow2", "-F", "qcow2", "top.qcow2"], outputs: &["top.qcow2"], post: &[&["info", "top.qcow2"], &["check", "top.qcow2"]], ..C },
    Case { args: &["rebase", "-u", "-b", "newbase.qcow2", "-F", "qcow2", "top.qcow2"], outputs: &["top.qcow2"], post: &[&["info", "top.qcow2"]], ..C },
    Case { args: &["rebase", "-b", "", "top.qcow2"], outputs: &["top.qcow2"], post: &[INFO_JSON_TOP], ..C },
    Case { args: &["rebase", "-b", "newbase.qcow2", "top.qcow2"], ..C },
    Case { args: &["rebase", "top.qcow2"], ..C },
    Case { args: &["rebase", "-c", "-b", "", "top.qcow2"], outputs: &["top.qcow2"], post: &[&["check", "top.qcow2"], &["map", "--output=json", "top.qcow2"]], ..C },
    Case { args: &["rebase", "-c", "-b", "newbase.qcow2", "-F", "qcow2", "top.qcow2"], outputs: &["top.qcow2"], post: &[&["check", "top.qcow2"], &["map", "--output=json", "top.qcow2"]], ..C },
    Case { args: &["rebase", "-c", "-u", "-b", "", "top.qcow2"], outputs: &["top.qcow2"], post: &[INFO_JSON_TOP], ..C },
    Case { args: &["rebase", "-c", "-b", "", "-f", "raw", "raw.img"], ..C },
    // --- amend ------------------------------------------------------------------------------------------
    Case { args: &["amend", "-o", "compat=1.1", "v2.qcow2"], outputs: &["v2.qcow2"], post: &[&["info", "v2.qcow2"], &["check", "v2.qcow2"]], ..C },
    Case { args: &["amend", "-o", "lazy_refcounts=on", "q.qcow2"], outputs: &["q.qcow2"], post: &[&["info", "q.qcow2"]], ..C },
    Case { args: &["amend", "-o", "cluster_size=4k", "q.qcow2"], ..C },
    Case { args: &["amend", "-f", "raw", "-o", "size=1M", "raw.img"], ..C },
    Case { args: &["amend", "-o", "backing_file=base.qcow2", "q.qcow2"], ..C },
    Case { args: &["amend", "-o", "refcount_bits=8", "q.qcow2"], outputs: &["q.qcow2"], post: &[&["info", "q.qcow2"], &["check", "q.qcow2"]], any_layout: true, ..C },
    Case { args: &["amend", "-o", "refcount_bits=64", "snap.qcow2"], outputs: &["snap.qcow2"], post: &[&["info", "--output=json", "snap.qcow2"], &["check", "snap.qcow2"]], any_layout: true, ..C },
    Case { args: &["amend", "-o", "refcount_bits=1", "q.qcow2"], outputs: &["q.qcow2"], post: &[&["info", "q.qcow2"], &["check", "q.qcow2"]], any_layout: true, ..C },
    Case { args: &["amend", "-o", "refcount_bits=1", "snap.qcow2"], outputs: &["snap.qcow2"], post: &[&["info", "snap.qcow2"]], ..C },
    Case { args: &["amend", "-o", "refcount_bits=3", "q.qcow2"], ..C },
    Case { args: &["amend", "-o", "refcount_bits=128", "q.qcow2"], ..C },
    Case { args: &["amend", "-o", "refcount_bits=8", "v2.qcow2"], ..C },
    Case { args: &["amend", "-o", "refcount_bits=8,compat=0.10", "q.qcow2"], ..C },
    Case { args: &["amend", "-o", "compat=1.1,refcount_bits=4", "v2.qcow2"], outputs: &["v2.qcow2"], post: &[&["info", "v2.qcow2"], &["check", "v2.qcow2"]], any_layout: true, ..C },
    // --- LUKS, with secrets from --object ----------------------------------------------------------
    Case { args: &["create", "-f", "luks", "--object", "secret,id=s0,data=pw", "-o", "key-secret=s0,iter-time=10", "l.luks", "4M"], ..C },
    Case { args: &["create", "-f", "luks", "-o", "key-secret=s0", "l.luks", "4M"], ..C },
    Case { args: &["create", "-f", "qcow2", "--object", "secret,id=s0,data=pw", "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", "out.qcow2", "4M"], post: &[OUT_ENC_CHECK], ..C },
    Case { args: &["create", "-f", "qcow2", "-o", "encrypt.format=luks,encrypt.iter-time=10", "out.qcow2", "4M"], ..C },
    Case { args: &["convert", "--object", "secret,id=s0,data=pw", "-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", "raw.img", "out.qcow2"], post: &[OUT_ENC_IS_RAW_IMG, OUT_ENC_CHECK], ..C },
    // A new LUKS image does not read as zero: the zero ranges of q.qcow2 are written too.
    Case { args: &["convert", "--object", "secret,id=s0,data=pw", "-O", "luks", "-o", "key-secret=s0,iter-time=10", "q.qcow2", "out.luks"], post: &[OUT_LUKS_IS_Q_QCOW2], ..C },
    // --- key slots: amend of LUKS and of qcow2 with encrypt.format=luks ------------------------------
    Case { args: &["amend", "--object", "secret,id=s0,data=pw", "--object", "secret,id=s1,data=pw2", "--image-opts", LUKS_IMAGE, "-o", "state=active,new-secret=s1,iter-time=10"], post: &[LUKS_S1_IS_RAW_IMG], ..C },
    Case { args: &["amend", "--object", "secret,id=s0,data=pw", "--image-opts", LUKS_IMAGE, "-o", "state=inactive,old-secret=s0"], post: &[LUKS_IS_RAW_IMG], ..C },
    Case { args: &["amend", "--object", "secret,id=s0,data=pw", "-f", "luks", "l.luks", "-o", "state=inactive,old-secret=s0"], ..C },
    Case { args: &["amend", "--object", "secret,id=s0,data=pw", "--image-opts", LUKS_IMAGE, "-o", "cipher-alg=aes-128"], ..C },
    Case { args: &["amend", "-f", "luks", "-o", "help", "l.luks"], ..C },
    Case { args: &["amend", "--object", "secret,id=s1,data=pw2", "-o", "encrypt.state=active,encrypt.new-secret=s1", "q.qcow2"], ..C },
    Case { args: &["amend", "-f", "qcow2", "-o", "help", "q.qcow2"], ..C },
    Case { args: &["amend", "--object", "secret,id=s0,data=pw", "--object", "secret,id=s1,data=pw2", "--image-opts", ENC_QCOW2_IMAGE, "-o", "encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time=10"], post: &[ENC_S1_IS_RAW_IMG], ..C },
    Case { args: &["convert", "--object", "secret,id=s0,data=pw", "--image-opts", LUKS_IMAGE, "out.raw"], outputs: &["out.raw"], ..C },
    Case { args: &["compare", "--object", "secret,id=s0,data=pw", "--image-opts", LUKS_IMAGE, "driver=raw,file.filename=raw.img"], ..C },
    Case { args: &["map", "--output=json", "--object", "secret,id=s0,data=pw", "--image-opts", LUKS_IMAGE], stdout: Out::Json, ..C },
    Case { args: &["info", "--object", "secret,id=s0,data=pw", "--image-opts", LUKS_IMAGE], ..C },
    Case { args: &["info", "--output=json", "--object", "secret,id=s0,data=pw", "--image-opts", LUKS_IMAGE], stdout: Out::Json, ..C },
    Case { args: &["info", "--image-opts", "driver=qcow2,file.filename=q.qcow2"], ..C },
    Case { args: &["compare", "--object", "secret,id=s0,data=wrong", "--image-opts", LUKS_IMAGE, "driver=raw,file.filename=raw.img"], ..C },
    Case { args: &["info", "l.luks"], ..C },
    Case { args: &["info", "--output=json", "l.luks"], stdout: Out::Json, ..C },
    Case { args: &["info", "enc.qcow2"], ..C },
    Case { args: &["info", "--output=json", "enc.qcow2"], stdout: Out::Json, ..C },
    Case { args: &["info", "--object", "secret,id=s0,data=wrong", "--image-opts", ENC_QCOW2_IMAGE], ..C },
    Case { args: &["map", "enc.qcow2"], ..C },
    Case { args: &["check", "l.luks"], ..C },
    Case { args: &["check", "--object", "secret,id=s0,data=pw", "--image-opts", ENC_QCOW2_IMAGE], ..C },
    Case { args: &["snapshot", "-l", "enc.qcow2"], ..C },
    Case { args: &["snapshot", "-l", "--object", "secret,id=s0,data=wrong", "--image-opts", ENC_QCOW2_IMAGE], ..C },
    Case { args: &["snapshot", "-l", "--object", "secret,id=s0,data=pw", "--image-opts", ENC_QCOW2_IMAGE], ..C },
    Case { args: &["snapshot", "-c", "s2", "--object", "secret,id=s0,data=pw", "--image-opts", ENC_QCOW2_IMAGE], post: &[ENC_CHECK], ..C },
    Case { args: &["snapshot", "-a", "s1", "--object", "secret,id=s0,data=pw", "--image-opts", ENC_QCOW2_IMAGE], post: &[ENC_CHECK, ENC_IS_RAW_IMG], ..C },
    Case { args: &["snapshot", "-d", "s1", "--object", "secret,id=s0,data=pw", "--image-opts", ENC_QCOW2_IMAGE], post: &[ENC_CHECK, ENC_LIST], ..C },
    Case { args: &["snapshot", "-c", "s2", "enc.qcow2"], post: &[ENC_LIST], ..C },
    Case { args: &["create", "-f", "qcow2", "-b", "enc.qcow2", "-F", "qcow2", "ov.qcow2"], outputs: &["ov.qcow2"], ..C },
    Case { args: &["convert", "--object", "secret,id=s0,data=pw", "--image-opts", ENC_OVERLAY, "-O", "raw", "out.raw"], outputs: &["out.raw"], ..C },
    Case { args: &["convert", "--object", "secret,id=s0,data=wrong", "--image-opts", ENC_OVERLAY, "-O", "raw", "out.raw"], ..C },
    Case { args: &["convert", "-O", "raw", "encov.qcow2", "out.raw"], ..C },
    Case { args: &["map", "--output=json", "--object", "secret,id=s0,data=pw", "--image-opts", ENC_OVERLAY], stdout: Out::Json, ..C },
    Case { args: &["compare", "--object", "secret,id=s0,data=pw", "--image-opts", ENC_OVERLAY, ENC_QCOW2_IMAGE], ..C },
    Case { args: &["info", "--image-opts", ENC_OVERLAY], ..C },
    Case { args: &["convert", "--object", "secret,id=s0,data=pw", ENC_OVERLAY_JSON, "out.raw"], outputs: &["out.raw"], ..C },
    Case { args: &["convert", "--object", "secret,id=s0,data=pw", "json:{\"driver\": \"qcow2\", \"file.filename\": \"encov.qcow2\", \"backing.encrypt.key-secret\": \"s0\"}", "out.raw"], outputs: &["out.raw"], ..C },
    Case { args: &["convert", "json:{\"driver\":", "out.raw"], ..C },
    Case { args: &["convert", "json:[1]", "out.raw"], ..C },
    Case { args: &["convert", "--object", "secret,id=s0,data=pw", "--image-opts", "driver=qcow2,file.filename=lov.qcow2,backing.key-secret=s0", "out.raw"], prep: &[&["create", "-q", "-f", "qcow2", "-b", "l.luks", "-F", "luks", "lov.qcow2"]], outputs: &["out.raw"], ..C },
    Case { args: &["create", "-f", "qcow2", "-b", "l.luks", "-F", "luks", "ov.qcow2"], outputs: &["ov.qcow2"], ..C },
    Case { args: &["convert", "--image-opts", "driver=luks,key-secret=s9,file.filename=l.luks", "out.raw"], ..C },
    // --- external data files ---------------------------------------------------------------------
    Case { args: &["create", "-f", "qcow2", "-o", "data_file=d.raw", "x.qcow2", "4M"], outputs: &["x.qcow2", "d.raw"], post: &[&["info", "--output=json", "x.qcow2"], &["map", "--output=json", "x.qcow2"], &["check", "x.qcow2"]], ..C },
    Case { args: &["create", "-f", "qcow2", "-o", "data_file=d.raw,data_file_raw=on", "x.qcow2", "4M"], outputs: &["x.qcow2", "d.raw"], post: &[&["info", "--output=json", "x.qcow2"], &["map", "--output=json", "x.qcow2"], &["check", "x.qcow2"]], ..C },
    Case { args: &["create", "-f", "qcow2", "-o", "data_file=d.raw,preallocation=full", "x.qcow2", "4M"], outputs: &["x.qcow2", "d.raw"], post: &[&["map", "--output=json", "x.qcow2"], &["check", "x.qcow2"]], ..C },
    Case { args: &["create", "-f", "qcow2", "-o", "data_file_raw=on", "x.qcow2", "4M"], ..C },
    Case { args: &["create", "-f", "qcow2", "-o", "data_file=d.raw,compat=0.10", "x.qcow2", "4M"], ..C },
    Case { args: &["create", "-f", "qcow2", "-o", "data_file=d.raw,data_file_raw=on", "-b", "raw.img", "-F", "raw", "x.qcow2"], ..C },
    Case { args: &["convert", "-O", "qcow2", "-o", "data_file=d.raw", "q.qcow2", "x.qcow2"], outputs: &["x.qcow2", "d.raw"], post: &[&["map", "--output=json", "x.qcow2"], &["check", "x.qcow2"], &["compare", "x.qcow2", "q.qcow2"]], ..C },
    Case { args: &["convert", "-n", "-O", "qcow2", "raw.img", "x.qcow2"], prep: &[DATA_FILE_IMAGE], outputs: &["x.qcow2", "d.raw"], post: &[&["map", "--output=json", "x.qcow2"], &["check", "x.qcow2"]], ..C },
    Case { args: &["convert", "-n", "-O", "qcow2", "raw.img", "x.qcow2"], prep: &[DATA_FILE_RAW_IMAGE], outputs: &["x.qcow2", "d.raw"], post: &[&["map", "--output=json", "x.qcow2"], &["check", "x.qcow2"]], ..C },
    Case { args: &["resize", "x.qcow2", "+1M"], prep: &[DATA_FILE_FROM_Q], outputs: &["x.qcow2", "d.raw"], post: &[&["map", "--output=json", "x.qcow2"], &["check", "x.qcow2"]], ..C },
    Case { args: &["resize", "--preallocation=full", "x.qcow2", "+1M"], prep: &[DATA_FILE_RAW_IMAGE], outputs: &["x.qcow2", "d.raw"], post: &[&["map", "--output=json", "x.qcow2"], &["check", "x.qcow2"]], ..C },
    Case { args: &["resize", "--shrink", "x.qcow2", "1M"], prep: &[DATA_FILE_FROM_Q], outputs: &["x.qcow2", "d.raw"], post: &[&["map", "--output=json", "x.qcow2"], &["check", "x.qcow2"]], ..C },
    Case { args: &["check", "x.qcow2"], prep: &[DATA_FILE_FROM_Q], ..C },
    Case { args: &["check", "--output=json", "x.qcow2"], prep: &[DATA_FILE_FROM_Q], stdout: Out::Json, ..C },
    Case { args: &["check", "-r", "all", "x.qcow2"], prep: &[DATA_FILE_FROM_Q], outputs: &["x.qcow2"], ..C },
    Case { args: &["snapshot", "-c", "s1", "x.qcow2"], prep: &[DATA_FILE_FROM_Q], ..C },
    Case { args: &["amend", "-o", "compat=0.10", "x.qcow2"], prep: &[DATA_FILE_FROM_Q], ..C },
    Case { args: &["commit", "x.qcow2"], prep: &[DATA_FILE_IMAGE], ..C },
    Case { args: &["dd", "-O", "qcow2", "if=raw.img", "of=x.qcow2", "bs=64k", "count=4"], prep: &[DATA_FILE_FROM_Q], outputs: &["x.qcow2"], ..C },
    // --- progress output, and more options ---------------------------------------------------------
    Case { args: &["compare", "-p", "top.qcow2", "top.qcow2"], ..C },
    Case { args: &["commit", "-p", "top.qcow2"], outputs: &["base.qcow2"], ..C },
    Case { args: &["rebase", "-p", "-b", "newbase.qcow2", "-F", "qcow2", "top.qcow2"], outputs: &["top.qcow2"], ..C },
    Case { args: &["info", "--output=json", "--backing-chain", "top.qcow2"], stdout: Out::Json, ..C },
    Case { args: &["convert", "-O", "qcow2", "-o", "preallocation=metadata", "q.qcow2", "out.qcow2"], outputs: &["out.qcow2"], post: &[&["check", "out.qcow2"]], ..C },
    Case { args: &["convert", "-q", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=128k", "top.qcow2", "out.qcow2"], outputs: &["out.qcow2"], ..C },
    Case { args: &["convert", "--salvage", "-O", "raw", "q.qcow2", "out.raw"], outputs: &["out.raw"], ..C },
    Case { args: &["resize", "--preallocation=falloc", "-f", "raw", "raw.img", "12M"], outputs: &["raw.img"], ..C },
    Case { args: &["resize", "--preallocation=full", "q.qcow2", "4M"], ..C },
    Case { args: &["resize", "--preallocation=metadata", "x.qcow2", "200M"], prep: &[EXTL2_FROM_Q], outputs: &["x.qcow2"], post: &[&["map", "--output=json", "x.qcow2"], &["check", "x.qcow2"], &["compare", "x.qcow2", "q.qcow2"]], ..C },
    Case { args: &["resize", "--preallocation=full", "x.qcow2", "+3M"], prep: &[EXTL2_FROM_Q], outputs: &["x.qcow2"], post: &[&["compare", "x.qcow2", "q.qcow2"]], ..C },
    Case { args: &["resize", "--preallocation=falloc", "x.qcow2", "+3M"], prep: &[EXTL2_FROM_Q], outputs: &["x.qcow2"], post: &[&["compare", "x.qcow2", "q.qcow2"]], ..C },
    Case { args: &["map", "--output=json", "--max-length", "1M", "raw.img"], stdout: Out::Json, ..C },
    Case { args: &["map", "--output=json", "--start-offset", "2G", "raw.img"], stdout: Out::Json, ..C },
    Case { args: &["measure", "-O", "qcow2", "--size", "100P"], ..C },
    Case { args: &["dd", "if=raw.img", "of=out.raw", "count=0"], outputs: &["out.raw"], ..C },
    Case { args: &["check", "-q", "q.qcow2"], ..C },
    Case { args: &["snapshot", "-c", "s1", "raw.img"], ..C },
    Case { args: &["amend", "-o", "compat=0.10", "q.qcow2"], outputs: &["q.qcow2"], post: &[&["info", "q.qcow2"], &["map", "--output=json", "q.qcow2"], &["check", "q.qcow2"]], ..C },
    Case { args: &["amend", "-o", "compat=0.10", "top.qcow2"], outputs: &["top.qcow2"], post: &[&["info", "top.qcow2"], &["check", "top.qcow2"]], ..C },
    Case { args: &["amend", "-o", "compat=0.10", "base.qcow2"], outputs: &["base.qcow2"], post: &[&["info", "base.qcow2"]], ..C },
    Case { args: &["info", "--output"], ..C },
    Case { args: &["convert", "--bitmaps", "-O", "qcow2", "q.qcow2", "out.qcow2"], outputs: &["out.qcow2"], ..C },
    Case { args: &["convert", "--bitmaps", "-O", "qcow2", "bm.qcow2", "out.qcow2"], outputs: &["out.qcow2"], post: &[&["info", "--output=json", "out.qcow2"], &["check", "out.qcow2"]], any_layout: true, ..C },
    Case { args: &["convert", "--bitmaps", "-O", "qcow2", "-o", "cluster_size=4k", "bm.qcow2", "out.qcow2"], outputs: &["out.qcow2"], post: &[&["info", "--output=json", "out.qcow2"], &["check", "out.qcow2"]], any_layout: true, ..C },
    Case { args: &["convert", "--bitmaps", "-n", "-O", "qcow2", "bm.qcow2", "q.qcow2"], prep: &[&["bitmap", "--add", "q.qcow2", "b0"]], outputs: &["q.qcow2"], post: &[&["info", "--output=json", "q.qcow2"]], any_layout: true, ..C },
    Case { args: &["convert", "--bitmaps", "-O", "qcow2", "bm.qcow2", "q.qcow2", "out.qcow2"], ..C },
    Case { args: &["convert", "--skip-broken-bitmaps", "-O", "qcow2", "bm.qcow2", "out.qcow2"], ..C },
    Case { args: &["convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", "bm.qcow2", "out.qcow2"], outputs: &["out.qcow2"], post: &[&["info", "--output=json", "out.qcow2"]], any_layout: true, ..C },
    Case { args: &["convert", "--bitmaps", "-O", "raw", "q.qcow2", "out.raw"], ..C },
    Case { args: &["convert", "--bitmaps", "-O", "qcow2", "raw.img", "out.qcow2"], ..C },
    Case { args: &["convert", "--foo", "raw.img", "out"], ..C },
    // --- bitmap ---------------------------------------------------------------------------------------
    Case { args: &["info", "bm.qcow2"], ..C },
    Case { args: &["info", "--output=json", "bm.qcow2"], stdout: Out::Json, ..C },
    Case { args: &["bitmap", "--add", "q.qcow2", "b1"], outputs: &["q.qcow2"], post: &[&["info", "--output=json", "q.qcow2"], &["check", "q.qcow2"]], any_layout: true, ..C },
    Case { args: &["bitmap", "--add", "-g", "128k", "--disable", "q.qcow2", "b1"], outputs: &["q.qcow2"], post: &[&["info", "q.qcow2"], &["check", "q.qcow2"]], any_layout: true, ..C },
    Case { args: &["bitmap", "--add", "-g", "0", "bm.qcow2", "b1"], outputs: &["bm.qcow2"], post: &[&["info", "--output=json", "bm.qcow2"], &["check", "bm.qcow2"]], any_layout: true, ..C },
    Case { args: &["bitmap", "--remove", "bm.qcow2", "b0"], outputs: &["bm.qcow2"], post: &[&["info", "--output=json", "bm.qcow2"], &["check", "bm.qcow2"]], any_layout: true, ..C },
    Case { args: &["bitmap", "--remove", "bm.qcow2", "b0"], prep: &[&["bitmap", "--remove", "bm.qcow2", "off"]], outputs: &["bm.qcow2"], post: &[&["info", "--output=json", "bm.qcow2"], &["check", "bm.qcow2"]], any_layout: true, ..C },
    Case { args: &["bitmap", "--clear", "--disable", "bm.qcow2", "b0"], outputs: &["bm.qcow2"], post: &[&["info", "--output=json", "bm.qcow2"], &["check", "bm.qcow2"]], any_layout: true, ..C },
    Case { args: &["bitmap", "--enable", "bm.qcow2", "off"], outputs: &["bm.qcow2"], post: &[&["info", "bm.qcow2"]], any_layout: true, ..C },
    Case { args: &["bitmap", "--merge", "b0", "bm.qcow2", "off"], outputs: &["bm.qcow2"], post: &[&["check", "bm.qcow2"]], any_layout: true, ..C },
    Case { args: &["bitmap", "--add", "--merge", "b0", "-b", "bm.qcow2", "-F", "qcow2", "q.qcow2", "new"], outputs: &["q.qcow2"], post: &[&["info", "--output=json", "q.qcow2"], &["check", "q.qcow2"]], any_layout: true, ..C },
    Case { args: &["bitmap", "--merge", "b0", "-b", "bm.qcow2", "-F", "raw", "q.qcow2", "b1"], prep: &[&["bitmap", "--add", "q.qcow2", "b1"]], ..C },
    Case { args: &["bitmap", "--remove", "--add", "q.qcow2", "b1"], outputs: &["q.qcow2"], post: &[&["info", "q.qcow2"]], any_layout: true, ..C },
    Case { args: &["bitmap", "--add", "--remove", "q.qcow2", "b1"], outputs: &["q.qcow2"], post: &[&["info", "q.qcow2"], &["check", "q.qcow2"]], any_layout: true, ..C },
    Case { args: &["bitmap", "--add", "bm.qcow2", "b0"], ..C },
    Case { args: &["bitmap", "--add", "--add", "q.qcow2", "z"], outputs: &["q.qcow2"], post: &[&["info", "--output=json", "q.qcow2"]], any_layout: true, ..C },
    Case { args: &["bitmap", "--add", "--disable", "--enable", "--disable", "-f", "qcow2", "-f", "qcow2", "q.qcow2", "y"], outputs: &["q.qcow2"], post: &[&["info", "--output=json", "q.qcow2"]], any_layout: true, ..C },
    Case { args: &["bitmap", "--clear", "bm.qcow2", "nope"], ..C },
    Case { args: &["bitmap", "--merge", "nope", "bm.qcow2", "b0"], ..C },
    Case { args: &["bitmap", "--add", "-g", "3M", "bm.qcow2", "x"], ..C },
    Case { args: &["bitmap", "--add", "-g", "1X", "bm.qcow2", "x"], ..C },
    Case { args: &["bitmap", "--add", "-g", "-1", "bm.qcow2", "x"], ..C },
    Case { args: &["bitmap", "--add", "bm.qcow2", ""], ..C },
    Case { args: &["bitmap", "--add", "v2.qcow2", "x"], ..C },
    Case { args: &["bitmap", "--add", "-f", "raw", "raw.img", "x"], ..C },
    Case { args: &["bitmap", "--clear", "-f", "raw", "raw.img", "x"], ..C },
    Case { args: &["bitmap", "bm.qcow2", "b0"], ..C },
    Case { args: &["bitmap", "--add", "bm.qcow2"], ..C },
    Case { args: &["bitmap", "--add", "bm.qcow2", "x", "y"], ..C },
    Case { args: &["bitmap", "-g", "64k", "--remove", "bm.qcow2", "b0"], ..C },
    Case { args: &["bitmap", "-b", "q.qcow2", "--add", "bm.qcow2", "x"], ..C },
    Case { args: &["bitmap", "-F", "qcow2", "--add", "bm.qcow2", "x"], ..C },
    Case { args: &["bitmap", "--add", "missing.qcow2", "x"], ..C },
    Case { args: &["bitmap", "--foo", "bm.qcow2", "x"], ..C },
    Case { args: &["resize", "bm.qcow2", "16M"], outputs: &["bm.qcow2"], post: &[&["info", "--output=json", "bm.qcow2"], &["check", "bm.qcow2"]], any_layout: true, ..C },
    Case { args: &["snapshot", "-c", "s2", "bm.qcow2"], outputs: &["bm.qcow2"], post: &[&["check", "bm.qcow2"]], any_layout: true, ..C },
    // --- the top level -----------------------------------------------------------------------------------
    Case { args: &["foo"], ..C },
    Case { args: &[], ..C },
];

const INFO_JSON_TOP: &[&str] = &["info", "--output=json", "top.qcow2"];
/// An empty 8 MiB qcow2 image keeping its data in d.raw, without and with data_file_raw.
const DATA_FILE_IMAGE: &[&str] = &[
    "create",
    "-q",
    "-f",
    "qcow2",
    "-o",
    "data_file=d.raw",
    "x.qcow2",
    "8M",
];
const DATA_FILE_RAW_IMAGE: &[&str] = &[
    "create",
    "-q",
    "-f",
    "qcow2",
    "-o",
    "data_file=d.raw,data_file_raw=on",
    "x.qcow2",
    "8M",
];
/// q.qcow2 with its data in d.raw.
const DATA_FILE_FROM_Q: &[&str] = &[
    "convert",
    "-O",
    "qcow2",
    "-o",
    "data_file=d.raw",
    "q.qcow2",
    "x.qcow2",
];
/// q.qcow2 with extended L2 entries (32 subclusters per cluster).
const EXTL2_FROM_Q: &[&str] = &[
    "convert",
    "-O",
    "qcow2",
    "-o",
    "extended_l2=on",
    "q.qcow2",
    "x.qcow2",
];
/// Images whose clusters are all allocated: over holes of the file (QEMU guesses metadata
/// preallocation and reports them as zero), and over allocated, unwritten space (data).
const PREALLOC_METADATA: &[&str] = &[
    "create",
    "-q",
    "-f",
    "qcow2",
    "-o",
    "preallocation=metadata",
    "pm.qcow2",
    "4M",
];
const PREALLOC_FALLOC: &[&str] = &[
    "create",
    "-q",
    "-f",
    "qcow2",
    "-o",
    "preallocation=falloc",
    "pf.qcow2",
    "4M",
];
const LUKS_IMAGE: &str = "driver=luks,key-secret=s0,file.filename=l.luks";
const ENC_QCOW2_IMAGE: &str = "driver=qcow2,encrypt.key-secret=s0,file.filename=enc.qcow2";
/// encov.qcow2 over enc.qcow2, the backing file's secret given as qemu-img takes it.
const ENC_OVERLAY: &str = "driver=qcow2,file.filename=encov.qcow2,backing.encrypt.key-secret=s0";
/// The same as a json: file name with the backing file spelled out, as qemu-img takes it.
const ENC_OVERLAY_JSON: &str = r#"json:{"driver": "qcow2", "file": {"driver": "file", "filename": "encov.qcow2"}, "backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "enc.qcow2"}, "encrypt": {"key-secret": "s0"}}}"#;
/// out.qcow2, encrypted by the case with the secret s0.
const OUT_ENC_IMAGE: &str = "driver=qcow2,encrypt.key-secret=s0,file.filename=out.qcow2";
const OUT_ENC_CHECK: &[&str] = &[
    "check",
    "--object",
    "secret,id=s0,data=pw",
    "--image-opts",
    OUT_ENC_IMAGE,
];
const OUT_ENC_IS_RAW_IMG: &[&str] = &[
    "compare",
    "--object",
    "secret,id=s0,data=pw",
    "--image-opts",
    OUT_ENC_IMAGE,
    "driver=raw,file.filename=raw.img",
];
const ENC_CHECK: &[&str] = &[
    "check",
    "--object",
    "secret,id=s0,data=pw",
    "--image-opts",
    ENC_QCOW2_IMAGE,
];
const ENC_LIST: &[&str] = &[
    "snapshot",
    "-l",
    "--object",
    "secret,id=s0,data=pw",
    "--image-opts",
    ENC_QCOW2_IMAGE,
];
const ENC_IS_RAW_IMG: &[&str] = &[
    "compare",
    "--object",
    "secret,id=s0,data=pw",
    "--image-opts",
    ENC_QCOW2_IMAGE,
    "driver=raw,file.filename=raw.img",
];
const LUKS_S1_IS_RAW_IMG: &[&str] = &[
    "compare",
    "--object",
    "secret,id=s1,data=pw2",
    "--image-opts",
    "driver=luks,key-secret=s1,file.filename=l.luks",
    "driver=raw,file.filename=raw.img",
];
const ENC_S1_IS_RAW_IMG: &[&str] = &[
    "compare",
    "--object",
    "secret,id=s1,data=pw2",
    "--image-opts",
    "driver=qcow2,encrypt.key-secret=s1,file.filename=enc.qcow2",
    "driver=raw,file.filename=raw.img",
];
const OUT_LUKS_IS_Q_QCOW2: &[&str] = &[
    "compare",
    "--object",
    "secret,id=s0,data=pw",
    "--image-opts",
    "driver=luks,key-secret=s0,file.filename=out.luks",
    "driver=qcow2,file.filename=q.qcow2",
];
const LUKS_IS_RAW_IMG: &[&str] = &[
    "compare",
    "--object",
    "secret,id=s0,data=pw",
    "--image-opts",
    LUKS_IMAGE,
    "driver=raw,file.filename=raw.img",
];
const ENC_QCOW2_FROM_RAW: &[&str] = &[
    "convert",
    "-O",
    "qcow2",
    "--object",
    "secret,id=s0,data=pw",
    "-o",
    "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
    "raw.img",
    "enc.qcow2",
];
const LUKS_FROM_RAW: &[&str] = &[
    "convert",
    "-O",
    "luks",
    "--object",
    "secret,id=s0,data=pw",
    "-o",
    "key-secret=s0,iter-time=10",
    "raw.img",
    "l.luks",
];

/// Runs qemu-img in `dir` (the guest writes of the fixture go through `common::qemu_io`).
fn qemu(dir: &Path, args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("qemu-img runs");
    assert!(out.status.success(), "qemu-img {args:?}: {:?}", out);
}

/// One image of the fixture: format, file, size (empty: the backing file's), more `qemu-img
/// create` options, then the guest writes qemu-io makes.
type Image = (
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
);

/// The images every case starts from (small and sparse).
#[rustfmt::skip]
const FIXTURE: &[Image] = &[
    ("raw", "raw.img", "8M", &[], &["write -P 0xa5 0 1M", "write -P 0x5a 3M 64k"]),
    ("raw", "small.raw", "1M", &[], &["write -P 0x11 4k 4k"]),
    ("qcow2", "q.qcow2", "8M", &[], &["write -P 1 0 1M", "write -z 2M 1M", "write -c -P 3 4M 64k", "write -P 4 6M 4k"]),
    ("qcow2", "base.qcow2", "8M", &[], &["write -P 7 0 4M", "write -P 8 7M 64k"]),
    ("qcow2", "top.qcow2", "", &["-b", "base.qcow2", "-F", "qcow2"], &["write -P 9 1M 128k", "write -z 3M 64k"]),
    ("qcow2", "newbase.qcow2", "8M", &[], &["write -P 7 0 1M", "write -P 2 5M 1M"]),
    ("qcow2", "v2.qcow2", "8M", &["-o", "compat=0.10"], &["write -P 6 0 256k"]),
    ("qcow2", "snap.qcow2", "8M", &[], &["write -P 1 0 64k"]),
];

fn make_fixture(dir: &Path) {
    for (format, file, size, options, writes) in FIXTURE {
        let mut args = vec!["create", "-q", "-f", format];
        args.extend(*options);
        args.push(file);
        args.extend((!size.is_empty()).then_some(*size));
        qemu(dir, &args);
        common::qemu_io(format, &dir.join(file), writes);
    }
    // l.luks holds raw.img, encrypted with the passphrase `pw` (secret s0).
    qemu(dir, LUKS_FROM_RAW);
    // enc.qcow2 holds raw.img too, in qcow2 with encrypt.format=luks; its snapshot s1 keeps
    // that, newer data follows.
    qemu(dir, ENC_QCOW2_FROM_RAW);
    qemu(
        dir,
        &[
            "snapshot",
            "--object",
            "secret,id=s0,data=pw",
            "-c",
            "s1",
            "--image-opts",
            ENC_QCOW2_IMAGE,
        ],
    );
    let out = Command::new("qemu-io")
        .args([
            "--object",
            "secret,id=s0,data=pw",
            "--image-opts",
            ENC_QCOW2_IMAGE,
        ])
        .args(["-c", "write -P 2 0 128k"])
        .current_dir(dir)
        .output()
        .expect("qemu-io runs");
    assert!(
        out.status.success() && out.stdout.starts_with(b"wrote"),
        "{out:?}"
    );
    qemu(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "enc.qcow2",
            "-F",
            "qcow2",
            "encov.qcow2",
        ],
    );
    // bm.qcow2 has an enabled bitmap b0 with the bits of its writes, and a disabled one, off.
    qemu(dir, &["create", "-q", "-f", "qcow2", "bm.qcow2", "8M"]);
    qemu(dir, &["bitmap", "--add", "bm.qcow2", "b0"]);
    qemu(
        dir,
        &[
            "bitmap",
            "--add",
            "-g",
            "128k",
            "--disable",
            "bm.qcow2",
            "off",
        ],
    );
    common::qemu_io(
        "qcow2",
        &dir.join("bm.qcow2"),
        &["write -P 1 100k 300k", "write -z 2M 64k", "write 5M 1k"],
    );
    // snap.qcow2 holds snapshot s1 of its first contents, then newer data.
    qemu(dir, &["snapshot", "-c", "s1", "snap.qcow2"]);
    common::qemu_io("qcow2", &dir.join("snap.qcow2"), &["write -P 2 0 128k"]);
}

/// A fresh copy of the fixture (holes kept).
fn copy_fixture(fixture: &Path, to: &Path) {
    let status = Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(format!("{}/.", fixture.display()))
        .arg(to)
        .status()
        .expect("cp runs");
    assert!(status.success());
}

fn run(program: &Path, args: &[&str], dir: &Path) -> Outcome {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("LC_ALL", "C")
        .env("TZ", "UTC")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// stdout without qemu-img's `    (x.xx/100%)\r` progress records.
fn without_progress(text: &str) -> String {
    let mut out = String::new();
    for piece in text.split_inclusive('\r') {
        if !(piece.ends_with("/100%)\r") && piece.trim_start().starts_with('(')) {
            out.push_str(piece);
        }
    }
    out
}

/// `check` output without the lines that say where the image ends.
fn without_layout(text: &str) -> String {
    text.split_inclusive('\n')
        .filter(|l| !l.starts_with("Image end offset:"))
        .collect()
}

fn without_actual_size(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("actual-size");
            m.values_mut().for_each(without_actual_size);
        }
        Value::Array(a) => a.iter_mut().for_each(without_actual_size),
        _ => {}
    }
}

fn same_stdout(kind: Out, ours: &str, theirs: &str) -> bool {
    match kind {
        Out::Text => without_progress(ours) == without_progress(theirs),
        Out::Json => {
            let parse = |t: &str| serde_json::from_str::<Value>(t).ok();
            match (parse(ours), parse(theirs)) {
                (Some(a), Some(b)) => a == b,
                _ => ours == theirs,
            }
        }
    }
}

/// The virtual size of an image and whether it reads like `reference` (qemu-img compare).
fn same_image(reference: &Path, other: &Path) -> Result<(), String> {
    let size = |p: &Path| {
        let out = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(p)
            .output()
            .expect("qemu-img info runs");
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v["virtual-size"].as_u64())
    };
    if size(reference) != size(other) {
        return Err(format!(
            "virtual sizes differ: {:?} {:?}",
            size(reference),
            size(other)
        ));
    }
    if size(reference).is_none() {
        return Ok(());
    }
    let out = Command::new("qemu-img")
        .arg("compare")
        .arg(reference)
        .arg(other)
        .output()
        .expect("qemu-img compare runs");
    match out.status.code() {
        Some(0) => Ok(()),
        // Images whose backing file is missing: compare what `info` says instead.
        Some(2) => {
            let info = |p: &Path| {
                let out = Command::new("qemu-img")
                    .args(["info", "--output=json", "-U"])
                    .arg(p)
                    .current_dir(p.parent().unwrap())
                    .output()
                    .expect("qemu-img info runs");
                let mut v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                without_actual_size(&mut v);
                v.to_string()
                    .replace(&p.parent().unwrap().display().to_string(), "")
            };
            if info(reference) == info(other) {
                Ok(())
            } else {
                Err(format!(
                    "info differs:\n{}\n{}",
                    info(other),
                    info(reference)
                ))
            }
        }
        _ => Err(String::from_utf8_lossy(&out.stdout).into_owned()),
    }
}

/// One run of a case: its outcome and the stdout of the follow-up commands.
struct Run {
    dir: tempfile::TempDir,
    outcome: Outcome,
    post: Vec<String>,
}

fn run_case(program: &Path, case: &Case, fixture: &Path) -> Run {
    let dir = common::temp_dir();
    copy_fixture(fixture, dir.path());
    for prep in case.prep {
        qemu(dir.path(), prep);
    }
    let outcome = run(program, case.args, dir.path());
    let post = case
        .post
        .iter()
        .map(|args| {
            let mut out = run(Path::new("qemu-img"), args, dir.path());
            if case.any_layout {
                out.stdout = without_layout(&out.stdout);
            }
            match serde_json::from_str::<Value>(&out.stdout) {
                Ok(mut v) => {
                    without_actual_size(&mut v);
                    if case.any_layout {
                        for child in v["children"].as_array_mut().into_iter().flatten() {
                            child["info"]["virtual-size"] = Value::Null;
                        }
                    }
                    v.to_string()
                }
                // `disk size` lines depend on how each tool happened to allocate.
                Err(_) => out
                    .stdout
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("disk size:"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            }
        })
        .collect();
    Run { dir, outcome, post }
}

#[test]
fn vdisk_and_its_qemu_img_link_behave_like_qemu_img() {
    let fixture = common::temp_dir();
    make_fixture(fixture.path());
    let links = common::temp_dir();
    let link: PathBuf = links.path().join("qemu-img");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vdisk"), &link).unwrap();
    let vdisk = PathBuf::from(env!("CARGO_BIN_EXE_vdisk"));
    assert!(CASES.len() >= 60, "{} cases", CASES.len());

    // Cases run on a few threads: most of the time goes to starting processes.
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                while let Some(case) = CASES.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let found = differences(case, fixture.path(), &vdisk, &link);
                    failures.lock().unwrap().extend(found);
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} runs differ from qemu-img:\n{}",
        failures.len(),
        CASES.len() * 2,
        failures.join("\n\n")
    );
}

/// What the vdisk and link runs of `case` do differently from qemu-img's run.
fn differences(case: &Case, fixture: &Path, vdisk: &Path, link: &Path) -> Vec<String> {
    let mut failures = Vec::new();
    let theirs = run_case(Path::new("qemu-img"), case, fixture);
    for (label, program) in [("vdisk", vdisk), ("qemu-img link", link)] {
        let ours = run_case(program, case, fixture);
        let mut why = Vec::new();
        if ours.outcome.code != theirs.outcome.code {
            why.push(format!(
                "exit status {:?}, qemu-img {:?}",
                ours.outcome.code, theirs.outcome.code
            ));
        }
        if !same_stdout(case.stdout, &ours.outcome.stdout, &theirs.outcome.stdout) {
            why.push(format!(
                "stdout:\n{}\nqemu-img:\n{}",
                ours.outcome.stdout, theirs.outcome.stdout
            ));
        }
        // The drop-in must word its messages as qemu-img does.
        if label == "qemu-img link"
            && ours.outcome.stderr_normalised() != theirs.outcome.stderr_normalised()
        {
            why.push(format!(
                "stderr:\n{}qemu-img:\n{}",
                ours.outcome.stderr, theirs.outcome.stderr
            ));
        }
        for name in case.outputs {
            let (a, b) = (theirs.dir.path().join(name), ours.dir.path().join(name));
            match (a.exists(), b.exists()) {
                (true, true) => {
                    if let Err(e) = same_image(&a, &b) {
                        why.push(format!("{name}: {e}"));
                    }
                }
                (x, y) if x != y => why.push(format!("{name}: exists {y}, qemu-img {x}")),
                _ => {}
            }
        }
        if ours.post != theirs.post {
            why.push(format!(
                "after {:?}:\n{:?}\nqemu-img:\n{:?}",
                case.post, ours.post, theirs.post
            ));
        }
        if !why.is_empty() {
            failures.push(format!("{label} {:?}: {}", case.args, why.join("; ")));
        }
    }
    failures
}
