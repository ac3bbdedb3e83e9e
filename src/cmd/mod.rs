//! One module per subcommand: a clap `Args` struct (its doc comments are the help text) and a
//! `run()`.

pub mod amend;
pub mod bench;
pub mod bitmap;
pub mod boot;
pub mod check;
mod check_luks2;
pub mod commit;
pub mod compare;
pub mod connect;
pub mod convert;
pub mod create;
pub mod dd;
pub mod disconnect;
pub mod info;
pub mod map;
pub mod measure;
pub mod mount;
pub mod qemu_nbd;
pub mod rebase;
pub mod resize;
pub mod serve;
pub mod snapshot;
pub mod umount;
