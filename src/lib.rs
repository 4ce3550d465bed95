//! vbdfs: a disk-image engine with copy-on-write, per-block zstd compression,
//! checksums and a crash-safe log, served through FUSE as a flat raw file.
//!
//! Layers, each owning one thing; data flows one way:
//!
//! ```text
//!   cli ── fuse front end ── control file
//!                │  read_at / write_at / flush / discard
//!          engine::Image  (open image: map, log, checkpoints, recovery)
//!                │
//!          cache  (bounded buffer cache of decoded blocks, write-back workers)
//!                │
//!          codec (zstd, checksums) ── format (byte layout) ── io (Store: file, mem, fault)
//! ```
//!
//! `unsafe` lives only in [`sys`]. Errors are one type, [`Error`], mapped to errno
//! in one place ([`Error::errno`]). The on-disk format is specified byte by byte
//! in `docs/format.md`.
#![deny(unsafe_code)]

pub mod cache;
pub mod cli;
pub mod codec;
pub mod control;
pub mod convert;
pub mod crypto;
pub mod engine;
pub mod error;
pub mod format;
pub mod fuse;
pub mod io;
pub mod sys;

pub use engine::{CheckReport, CreateOptions, Image, ImageStats, OpenOptions};
pub use error::{Error, ErrorKind, Result};
pub use format::Codec;
