//! A NAR made into files: what [`super::unpack`] hands the reader.

use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use super::reader::{Contents, Visitor};
use super::NarError;
use crate::sys::fs::set_mtime_1;

/// Makes each node at the current path; entries extend the path.
pub(super) struct Unpacker {
    path: PathBuf,
}

impl Unpacker {
    pub(super) fn new(dest: &std::path::Path) -> Unpacker {
        Unpacker {
            path: dest.to_path_buf(),
        }
    }

    fn fail(&self, what: &'static str) -> impl FnOnce(io::Error) -> NarError + '_ {
        move |source| NarError::Unpack {
            what,
            path: self.path.clone(),
            source,
        }
    }

    fn finish(&self, mode: u32) -> Result<(), NarError> {
        if mode != 0 {
            std::fs::set_permissions(&self.path, Permissions::from_mode(mode))
                .map_err(self.fail("chmod"))?;
        }
        set_mtime_1(&self.path).map_err(self.fail("setting the mtime of"))
    }
}

impl Visitor for Unpacker {
    fn regular(&mut self, executable: bool, contents: &mut Contents<'_>) -> Result<(), NarError> {
        let mut file: File = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(self.fail("creating"))?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = contents.read_chunk(&mut buf)?;
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n]).map_err(self.fail("writing"))?;
        }
        drop(file);
        self.finish(if executable { 0o555 } else { 0o444 })
    }

    fn symlink(&mut self, target: &[u8]) -> Result<(), NarError> {
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &self.path)
            .map_err(self.fail("creating the symlink"))?;
        self.finish(0)
    }

    fn directory(&mut self) -> Result<(), NarError> {
        std::fs::create_dir(&self.path).map_err(self.fail("creating"))
    }

    fn enter(&mut self, name: &[u8]) {
        self.path.push(std::ffi::OsStr::from_bytes(name));
    }

    fn leave(&mut self) {
        self.path.pop();
    }

    fn directory_done(&mut self) -> Result<(), NarError> {
        self.finish(0o555)
    }
}
