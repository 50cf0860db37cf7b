//! Output files written safely: [`AtomicFile`] creates a fresh temporary file beside the destination with
//! `O_CREAT | O_EXCL` (so it never follows or truncates an existing path, symlinks included), is written (by
//! streaming, with seeks if needed), and only [`AtomicFile::commit`] renames it over the destination. Dropped
//! without a commit, it removes its temporary file: a failed run leaves nothing behind. Creating it is the
//! destination check, so a command can create its outputs before its long run starts.

use crate::Error;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// A file under construction; see the module docs.
#[derive(Debug)]
pub struct AtomicFile {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), reason: e.to_string() }
}

impl AtomicFile {
    /// Creates the temporary file in `dest`'s directory (which must exist and be writable).
    pub fn create(dest: &Path) -> Result<Self, Error> {
        let name = dest.file_name().ok_or_else(|| Error::Io { path: dest.display().to_string(), reason: "not a file name".into() })?;
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(Error::Io { path: dir.display().to_string(), reason: "the output directory does not exist".into() });
        }
        if dest.is_dir() {
            return Err(Error::Io { path: dest.display().to_string(), reason: "is a directory".into() });
        }
        // A unique name per process and attempt; O_EXCL refuses any existing entry (a planted symlink too).
        for attempt in 0..100u32 {
            let tmp = dir.join(format!(".{}.{}.{attempt}.partial", name.to_string_lossy(), std::process::id()));
            match OpenOptions::new().write(true).read(true).create_new(true).open(&tmp) {
                Ok(file) => return Ok(AtomicFile { file: Some(file), tmp, dest: dest.to_path_buf() }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io(&tmp, e)),
            }
        }
        Err(Error::Io { path: dir.display().to_string(), reason: "no free temporary name".into() })
    }

    /// The open temporary file.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("present until commit")
    }

    /// The destination path.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Writes `bytes` as the whole file and commits it.
    pub fn write_all_and_commit(mut self, bytes: &[u8]) -> Result<(), Error> {
        use std::io::Write;
        let tmp = self.tmp.clone();
        self.file().write_all(bytes).map_err(|e| io(&tmp, e))?;
        self.commit()
    }

    /// Flushes to disk and renames the file over the destination (replacing an entry there, never writing
    /// through it).
    pub fn commit(mut self) -> Result<(), Error> {
        let file = self.file.take().expect("present until commit");
        file.sync_all().map_err(|e| io(&self.tmp, e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| io(&self.dest, e))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
