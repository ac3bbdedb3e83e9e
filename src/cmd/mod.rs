//! One module per subcommand: a clap `Args` struct (its doc comments are the help text) and a
//! `run()`.

pub mod bench;
pub mod check;
pub mod compare;
pub mod convert;
pub mod create;
pub mod dd;
pub mod info;
pub mod map;
pub mod measure;
pub mod resize;
pub mod snapshot;
