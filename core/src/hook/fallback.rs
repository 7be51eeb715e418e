//! The `[hook] fallback` hook: a `try` nsh declines is handed to it, and
//! the whole conversation is relayed to it once it accepts.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Child, ChildStdin, Command, Stdio};

use super::protocol::{Reply, ReplyWord, Settings, Try, Verbosity};
use super::{pipeline, Ui, EXIT_MISC};
use crate::error::Failure;

/// The fallback hook, running: started at the first `try` it is asked
/// about, given the daemon's settings once.
pub(super) struct Fallback {
    program: String,
    child: Child,
    stdin: ChildStdin,
    output: BufReader<File>,
}

/// What the fallback answered a `try` with.
pub(super) enum Answer {
    /// It accepted: the caller relays the rest to it.
    Accepted,
    /// It declined or postponed; asked again next time.
    Answered,
    /// It declined permanently: for the fallback only, so it is dropped and
    /// nsh may still take later `try`s.
    Gone,
}

impl Fallback {
    /// Starts `argv` as a build hook (with Nix's verbosity, the build log as
    /// its fd 4, its stdout and stderr to one pipe) and hands it the
    /// settings.
    pub(super) fn start(
        argv: &[String],
        verbosity: Verbosity,
        settings: &Settings,
        log_fd: Option<&OwnedFd>,
    ) -> Result<Fallback, Failure> {
        let program = argv.first().cloned().unwrap_or_default();
        let pipe_failed = |e: io::Error| Failure::transient(format!("creating a pipe: {e}"));
        let (read, write) = pipeline::pipe().map_err(pipe_failed)?;
        let mut cmd = Command::new(&program);
        cmd.args(argv.iter().skip(1))
            .arg((verbosity as u8).to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::from(write.try_clone().map_err(pipe_failed)?))
            .stderr(Stdio::from(write));
        if let Some(fd) = log_fd {
            crate::sys::process::with_fd_as(&mut cmd, fd.as_raw_fd(), 4);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| Failure::config(format!("starting {program}: {e}")))?;
        let mut stdin = crate::sys::process::stdin_of(&mut child)
            .map_err(|e| Failure::transient(format!("{program}: {e}")))?;
        stdin
            .write_all(&settings.to_bytes())
            .map_err(|e| Failure::transient(format!("writing the settings to {program}: {e}")))?;
        Ok(Fallback {
            program,
            child,
            stdin,
            output: BufReader::new(read),
        })
    }

    /// Hands it the `try` and forwards its reply to the daemon.
    pub(super) fn ask(&mut self, t: &Try, ui: &Ui) -> Result<Answer, Failure> {
        let program = self.program.clone();
        self.stdin
            .write_all(&t.to_bytes())
            .and_then(|()| self.stdin.flush())
            .map_err(|e| Failure::transient(format!("writing the try to {program}: {e}")))?;
        let read_failed =
            |e: io::Error| Failure::transient(format!("reading {program}'s reply: {e}"));
        loop {
            let mut line = String::new();
            if self.output.read_line(&mut line).map_err(read_failed)? == 0 {
                return Err(Failure::transient(format!(
                    "{program} exited without replying"
                )));
            }
            let answer = match Reply::parse(&line) {
                Some(ReplyWord::Accept) => {
                    let mut machine = String::new();
                    self.output.read_line(&mut machine).map_err(read_failed)?;
                    ui.reply(&Reply::Accept {
                        machine: machine.trim_end_matches('\n').to_string(),
                    });
                    Answer::Accepted
                }
                Some(ReplyWord::Decline) => {
                    ui.reply(&Reply::Decline);
                    Answer::Answered
                }
                Some(ReplyWord::Postpone) => {
                    ui.reply(&Reply::Postpone);
                    Answer::Answered
                }
                Some(ReplyWord::DeclinePermanently) => {
                    ui.reply(&Reply::Decline);
                    Answer::Gone
                }
                None => {
                    // `@nix` lines and plain text: what the daemon would
                    // have seen.
                    ui.write(line.as_bytes());
                    continue;
                }
            };
            return Ok(answer);
        }
    }

    /// After it accepted: the daemon's bytes to it, its output to the
    /// daemon, until it exits; its exit status is the hook's.
    pub(super) fn relay(self, mut input: BufReader<File>) -> i32 {
        let Fallback {
            mut child,
            mut stdin,
            mut output,
            ..
        } = self;
        std::thread::spawn(move || {
            let _ = stdin.write_all(input.buffer());
            let consumed = input.buffer().len();
            input.consume(consumed);
            let _ = io::copy(input.get_mut(), &mut stdin);
        });
        let mut err = io::stderr();
        let _ = err.write_all(output.buffer());
        let consumed = output.buffer().len();
        output.consume(consumed);
        let _ = io::copy(output.get_mut(), &mut err);
        match child.wait() {
            Ok(status) => status.code().unwrap_or(EXIT_MISC),
            Err(_) => EXIT_MISC,
        }
    }
}
