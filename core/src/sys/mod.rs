//! The system calls std does not wrap, and the only module of `nsh-core`
//! with `unsafe` code (the workspace denies `unsafe_code`; each file here
//! allows it and says why at each block).
//!
//! rustix is used where it has a safe call (flock, access, utimensat, ids,
//! pipes, fcntl, kill, setsid, setpgid, the parent-death signal); libc where
//! it has none: signal handlers (`sigaction`), `poll`, `dup2` onto a descriptor this
//! process does not own, `getpwuid`, and turning a raw descriptor number
//! handed to us by a parent into an owned file.
//!
//! * [`flock`]: one `flock(2)` wrapper, retried on EINTR;
//! * [`signals`]: one set-up of the interrupt handlers, and ignoring signals;
//! * [`process`]: ids, a user's name, signalling children, what a child
//!   does between fork and exec, a child's output within a time limit;
//! * [`fds`]: descriptors inherited from a parent, pipes;
//! * [`fs`]: access checks, store mtimes, random bytes;
//! * [`idle`]: pipe ends that wait for their peer at most so long (`poll`).

pub mod fds;
pub mod flock;
pub mod fs;
pub mod idle;
pub mod process;
pub mod signals;
