//! Nix's temporary GC roots for a local store, as Nix 2.8 to 2.34 keep them
//! (`LocalStore::addTempRoot`, `libstore/gc.cc`): paths this process is
//! about to make valid, or needs to stay valid, that the garbage collector
//! must not delete meanwhile.
//!
//! * Each process has a file `<state dir>/temproots/<pid>`, created afresh,
//!   held with an exclusive `flock` for the process's life (the collector
//!   takes a file it can lock as a dead process's and removes it), holding
//!   the roots as `<store path>\0`.
//! * A root is written there under a shared `flock` on `<state dir>/gc.lock`.
//!   When that lock is not free, a collector is running and has read the
//!   files already: the root is then also sent to it over
//!   `<state dir>/gc-socket/socket` (`<path>\n`, answered `1`).
//!
//! The collector skips any entry of the store directory whose hash part is a
//! temporary root, valid or not, so a tree placed under such a name survives
//! until it is registered.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::nix::store_path::StorePath;
use crate::sys::flock::{lock_exclusive, lock_shared, unlock, Wait};

/// How often a vanished or refused collector socket is tried again (Nix
/// retries forever, every 0.1 s).
const SOCKET_TRIES: u32 = 600;

/// How often a roots file the collector removed under us is made again.
const FILE_TRIES: u32 = 100;

/// This process's temporary roots in one store.
pub struct TempRoots {
    state_dir: PathBuf,
    file: File,
    path: PathBuf,
    /// The connection to a running collector, once one was needed.
    socket: Option<UnixStream>,
}

impl TempRoots {
    /// Makes this process's roots file in `state_dir` (the store's state
    /// directory, `/nix/var/nix` by default) and takes its lock.
    ///
    /// # Errors
    /// Creating or locking the file.
    pub fn new(state_dir: &Path) -> io::Result<TempRoots> {
        let dir = state_dir.join("temproots");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(std::process::id().to_string());
        for _ in 0..FILE_TRIES {
            // A file of this pid is a dead process's: pids are unique.
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let file = crate::sys::fs::open_lock_file(&path)?;
            lock_exclusive(&file, Wait::Block)?;
            // Empty: ours. Not empty: the collector marked it dead before we
            // had the lock (it writes a byte into a file it removes).
            if file.metadata()?.len() == 0 {
                return Ok(TempRoots {
                    state_dir: state_dir.to_path_buf(),
                    file,
                    path,
                    socket: None,
                });
            }
        }
        Err(io::Error::other(format!(
            "{} was removed under this process {FILE_TRIES} times",
            path.display()
        )))
    }

    /// Makes `path` a temporary root for the rest of this process's life
    /// (or until this is dropped).
    ///
    /// # Errors
    /// Writing the roots file, or telling a running collector.
    pub fn add(&mut self, path: &StorePath) -> io::Result<()> {
        let gc_lock = crate::sys::fs::open_lock_file(&self.state_dir.join("gc.lock"))?;
        let mut tries = 0;
        // A shared lock means no collector runs: the file is enough.
        while !lock_shared(&gc_lock, Wait::DontWait)? {
            match self.tell_collector(path) {
                Ok(()) => break,
                Err(e) if tries < SOCKET_TRIES && collector_went_away(&e) => {
                    self.socket = None;
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
        let mut entry = path.as_str().as_bytes().to_vec();
        entry.push(0);
        let written = self.file.write_all(&entry);
        let _ = unlock(&gc_lock);
        written
    }

    /// Sends `path` to the running collector and waits for its `1`.
    fn tell_collector(&mut self, path: &StorePath) -> io::Result<()> {
        if self.socket.is_none() {
            let socket = self.state_dir.join("gc-socket").join("socket");
            self.socket = Some(UnixStream::connect(socket)?);
        }
        let Some(socket) = self.socket.as_mut() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        socket.write_all(format!("{path}\n").as_bytes())?;
        let mut ack = [0u8; 1];
        socket.read_exact(&mut ack)?;
        if ack[0] == b'1' {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the garbage collector answered {:?}, not 1", ack[0]),
            ))
        }
    }
}

/// A collector that has not made its socket yet, refused it, or ended
/// (closed the connection): Nix tries again.
fn collector_went_away(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::UnexpectedEof
    )
}

/// Removed as Nix removes its own: the roots end with the process anyway
/// (the lock goes with it), this only tidies up.
impl Drop for TempRoots {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::store_path::test_path;
    use std::os::unix::net::UnixListener;

    const A: &str = "/nix/store/00000000000000000000000000000000-a";
    const B: &str = "/nix/store/11111111111111111111111111111111-b";

    #[test]
    fn roots_go_to_this_processs_locked_file() {
        let state = tempfile::tempdir().unwrap();
        let mut roots = TempRoots::new(state.path()).unwrap();
        roots.add(&test_path(A)).unwrap();
        roots.add(&test_path(B)).unwrap();
        let file = state
            .path()
            .join("temproots")
            .join(std::process::id().to_string());
        assert_eq!(
            std::fs::read(&file).unwrap(),
            format!("{A}\0{B}\0").as_bytes()
        );
        // Held: a collector's non-blocking exclusive lock fails.
        let other = File::options().write(true).open(&file).unwrap();
        assert!(!lock_exclusive(&other, Wait::DontWait).unwrap());
        drop(roots);
        assert!(!file.exists());
    }

    #[test]
    fn a_running_collector_is_told_over_its_socket() {
        let state = tempfile::tempdir().unwrap();
        let mut roots = TempRoots::new(state.path()).unwrap();
        // A "collector": holds gc.lock exclusively and answers on the socket.
        let gc_lock = crate::sys::fs::open_lock_file(&state.path().join("gc.lock")).unwrap();
        lock_exclusive(&gc_lock, Wait::Block).unwrap();
        std::fs::create_dir(state.path().join("gc-socket")).unwrap();
        let listener = UnixListener::bind(state.path().join("gc-socket/socket")).unwrap();
        let collector = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            let mut byte = [0u8; 1];
            while byte[0] != b'\n' {
                conn.read_exact(&mut byte).unwrap();
                got.push(byte[0]);
            }
            conn.write_all(b"1").unwrap();
            String::from_utf8(got).unwrap()
        });
        roots.add(&test_path(A)).unwrap();
        assert_eq!(collector.join().unwrap(), format!("{A}\n"));
        // …and it is in the file too, for the next collector.
        let file = state
            .path()
            .join("temproots")
            .join(std::process::id().to_string());
        assert_eq!(std::fs::read(file).unwrap(), format!("{A}\0").as_bytes());
    }
}
