//! The loop every nsh tool runs: tickets in on stdin, one per line; each
//! ticket out on stdout with the tool's section added; failures recorded in
//! the ticket and reflected in the exit status.
//!
//! Keeping this in one place is what makes `a | b | c` behave the same
//! whichever tools are composed: a ticket that already carries an `error` is
//! passed through untouched, and the exit status is that of the first failed
//! ticket.

use std::io::{BufRead, Write};

use crate::error::{Failure, Kind};
use crate::exit::ExitStatus;
use crate::ticket::Ticket;
use crate::{log_debug, log_error};

/// The start of every tool's `main`: names the tool in log lines and parses
/// its command line. `--help` and `--version` end the process here with 0, a
/// usage error with 64 (clap's own message on stderr).
pub fn start<A: clap::Parser>(program: &str) -> A {
    crate::log::set_program(program);
    match A::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            let status = if e.use_stderr() {
                ExitStatus::Usage
            } else {
                ExitStatus::Ok
            };
            std::process::exit(status.code())
        }
    }
}

/// Runs `stage_fn` on every ticket (it adds its section in place) read from `input`, writing results to `output`.
///
/// * a line that is not a ticket is reported (bad input) and answered with an
///   error ticket that carries the line under `input`, so nothing is lost;
/// * a ticket with `error` is forwarded untouched;
/// * `stage_fn` failing records `error: {stage, kind, message}` in the ticket.
///
/// Returns the status of the first failed ticket, or `Ok`.
pub fn run_stage<R: BufRead, W: Write>(
    stage: &str,
    input: R,
    mut output: W,
    mut stage_fn: impl FnMut(&mut Ticket) -> Result<(), Failure>,
) -> ExitStatus {
    let mut status = ExitStatus::Ok;
    let mut note = |s: ExitStatus| {
        if status == ExitStatus::Ok {
            status = s;
        }
    };
    for line in input.lines() {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                log_error!("reading tickets from stdin: {e}");
                note(ExitStatus::BadInput);
                break;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let out = match Ticket::from_line(&line) {
            Err(failure) => {
                log_error!("{failure}");
                note(ExitStatus::of(failure.kind));
                let mut ticket = Ticket::new();
                ticket.fail(stage, &failure);
                ticket
                    .extra
                    .insert("input".into(), serde_json::Value::String(line.clone()));
                ticket
            }
            Ok(ticket) if ticket.error.is_some() => {
                let err = ticket.error.as_ref().expect("checked");
                log_debug!("passing on a ticket that failed at {}", err.stage);
                note(ExitStatus::of(err.kind));
                ticket
            }
            Ok(mut ticket) => {
                if let Err(failure) = stage_fn(&mut ticket) {
                    log_error!("{failure}");
                    note(ExitStatus::of(failure.kind));
                    ticket.fail(stage, &failure);
                }
                ticket
            }
        };
        if let Err(e) = writeln!(output, "{}", out.to_line()).and_then(|()| output.flush()) {
            // The reader went away: nothing more can be reported on stdout.
            log_error!("writing the ticket to stdout: {e}");
            note(ExitStatus::of(Kind::Transient));
            break;
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &str, f: impl FnMut(&mut Ticket) -> Result<(), Failure>) -> (ExitStatus, String) {
        let mut out = Vec::new();
        let status = run_stage("test", input.as_bytes(), &mut out, f);
        (status, String::from_utf8(out).unwrap())
    }

    #[test]
    fn adds_a_section_and_keeps_the_rest() {
        let (status, out) = run("{\"v\":1,\"x\":1}\n\n{\"v\":1}\n", |t| {
            t.extra.insert("seen".into(), true.into());
            Ok(())
        });
        assert_eq!(status, ExitStatus::Ok);
        assert_eq!(
            out,
            "{\"v\":1,\"x\":1,\"seen\":true}\n{\"v\":1,\"seen\":true}\n"
        );
    }

    #[test]
    fn failed_tickets_pass_through_with_their_status() {
        let input = r#"{"v":1,"error":{"stage":"alloc","kind":"timed-out","message":"queue"}}"#;
        let (status, out) = run(input, |_| panic!("must not be called"));
        assert_eq!(status, ExitStatus::TimedOut);
        assert_eq!(out.trim_end(), input);
    }

    #[test]
    fn a_failure_is_recorded_and_the_first_one_decides_the_status() {
        let (status, out) = run("{\"v\":1}\n{\"v\":1}\n", |_| {
            Err(Failure::transient("node gone"))
        });
        assert_eq!(status, ExitStatus::Transient);
        assert_eq!(out.lines().count(), 2);
        assert!(
            out.contains(r#""error":{"stage":"test","kind":"transient","message":"node gone"}"#)
        );
    }

    #[test]
    fn garbage_is_bad_input_and_not_lost() {
        let (status, out) = run("hello\n", |_| Ok(()));
        assert_eq!(status, ExitStatus::BadInput);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["input"], "hello");
        assert_eq!(v["error"]["kind"], "input");
    }
}
