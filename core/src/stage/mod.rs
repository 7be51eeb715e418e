//! The five stages of a build, one tool each: [`closure`], [`alloc`],
//! [`push`], [`run`], [`fetch`], and what they share: reaching the node
//! ([`ssh`]), trying again ([`retry`]), letting a job end ([`release`]) and
//! reporting what they wait for or copy ([`progress`]).

pub mod alloc;
pub mod closure;
pub mod fetch;
pub mod progress;
pub mod push;
pub mod release;
pub mod retry;
pub mod run;
pub mod ssh;
