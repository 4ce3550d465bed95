//! qcow2 output (placeholder).
use super::progress::Progress;
use crate::engine::Image;
use crate::{Error, ErrorKind, Result};
use std::fs::File;

/// Writes `img` as qcow2 into `out`.
pub fn write(_img: &Image, _out: &File, _bar: &Progress) -> Result<()> {
    Err(Error::new(
        ErrorKind::Unsupported,
        "qcow2 export is not available yet",
    ))
}
