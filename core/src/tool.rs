//! The loop every nsh tool runs: tickets in on stdin, one per line; each
//! ticket out on stdout with the tool's section added; failures recorded in
//! the ticket and reflected in the exit status.
//!
//! Keeping this in one place is what makes `a | b | c` behave the same
//! whichever tools are composed: a ticket that already carries an `error` is
//! passed through untouched, and the exit status is that of the first failed
//! ticket.

use std::io::{BufRead, Write};

use crate::lines::{BoundedLines, MAX_TICKET_LINE};

use crate::error::{Failure, Kind};
use crate::exit::ExitStatus;
use crate::ticket::Ticket;
use crate::{log_debug, log_error};

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
    output: W,
    stage_fn: impl FnMut(&mut Ticket) -> Result<(), Failure>,
) -> ExitStatus {
    run_tickets(stage, input, output, FailedTickets::PassOn, stage_fn)
}

/// Like [`run_stage`], for a clean-up step (`nsh-alloc --cancel`) that must
/// also act on tickets that failed earlier: `cleanup_fn` sees every ticket.
/// A failed ticket keeps its first error and its status; a clean-up failure
/// is recorded only in a ticket that had none.
pub fn run_cleanup_stage<R: BufRead, W: Write>(
    stage: &str,
    input: R,
    output: W,
    cleanup_fn: impl FnMut(&mut Ticket) -> Result<(), Failure>,
) -> ExitStatus {
    run_tickets(stage, input, output, FailedTickets::Visit, cleanup_fn)
}

/// Runs `stage_fn` on `ticket`, a panic becoming an [`Kind::Internal`]
/// failure: what the stage held is dropped on the way out (its guards cancel
/// jobs and remove temporary files), the panic's message is kept, and the
/// process does not end with Rust's 101, Nix's "timed out".
fn run_caught(
    stage_fn: &mut impl FnMut(&mut Ticket) -> Result<(), Failure>,
    ticket: &mut Ticket,
) -> Result<(), Failure> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| stage_fn(ticket))).unwrap_or_else(
        |panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(ToString::to_string)
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_string());
            Err(Failure::new(
                Kind::Internal,
                format!("internal error (a bug in nsh; please report it): {what}"),
            ))
        },
    )
}

/// What the loop does with a ticket that already carries an `error`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FailedTickets {
    PassOn,
    Visit,
}

fn run_tickets<R: BufRead, W: Write>(
    stage: &str,
    input: R,
    mut output: W,
    failed_tickets: FailedTickets,
    mut stage_fn: impl FnMut(&mut Ticket) -> Result<(), Failure>,
) -> ExitStatus {
    let mut status = ExitStatus::Ok;
    let mut note = |s: ExitStatus| {
        if status == ExitStatus::Ok {
            status = s;
        }
    };
    for line in BoundedLines::new(input, MAX_TICKET_LINE) {
        let line = match line {
            // A line cut at the bound is no ticket: it is answered as one.
            Ok(line) => String::from_utf8_lossy(&line.bytes).into_owned(),
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
            Ok(mut ticket) => {
                if let Some(err) = &ticket.error {
                    note(ExitStatus::of(err.kind));
                    if failed_tickets == FailedTickets::PassOn {
                        log_debug!("passing on a ticket that failed at {}", err.stage);
                        if emit(&mut output, &ticket) {
                            continue;
                        }
                        note(ExitStatus::of(Kind::Transient));
                        break;
                    }
                }
                // A clean-up step (`--cancel`) is no build in flight.
                let recorded = failed_tickets == FailedTickets::PassOn;
                if recorded {
                    crate::status::begin(stage, &ticket);
                }
                let result = run_caught(&mut stage_fn, &mut ticket);
                if let Err(failure) = &result {
                    log_error!("{failure}");
                    note(ExitStatus::of(failure.kind));
                    if ticket.error.is_none() {
                        ticket.fail(stage, failure);
                    }
                }
                if recorded {
                    crate::status::end(&ticket, result.is_err());
                }
                ticket
            }
        };
        if !emit(&mut output, &out) {
            note(ExitStatus::of(Kind::Transient));
            break;
        }
    }
    status
}

/// Writes one ticket line; false when the reader went away (then nothing
/// more can be reported on stdout).
fn emit(output: &mut impl Write, ticket: &Ticket) -> bool {
    match writeln!(output, "{}", ticket.to_line()).and_then(|()| output.flush()) {
        Ok(()) => true,
        Err(e) => {
            log_error!("writing the ticket to stdout: {e}");
            false
        }
    }
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
    fn a_panic_is_an_internal_error_not_101_and_the_next_ticket_runs() {
        let mut n = 0;
        let (status, out) = run("{\"v\":1}\n{\"v\":1}\n", |_| {
            n += 1;
            assert!(n != 1, "the first ticket breaks it");
            Ok(())
        });
        assert_eq!(status, ExitStatus::Internal);
        assert_eq!(status.code(), 70);
        let tickets: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(tickets[0]["error"]["kind"], "internal");
        let message = tickets[0]["error"]["message"].as_str().unwrap();
        assert!(message.contains("a bug in nsh"), "{message}");
        assert!(message.contains("the first ticket breaks it"), "{message}");
        assert!(tickets[1].get("error").is_none());
        assert_eq!(n, 2);
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

    #[test]
    fn a_cleanup_stage_sees_failed_tickets_and_keeps_their_first_error() {
        let failed = r#"{"v":1,"error":{"stage":"run","kind":"timed-out","message":"slow"}}"#;
        let mut seen = 0;
        let mut out = Vec::new();
        let status = run_cleanup_stage(
            "alloc",
            format!("{failed}\n{{\"v\":1}}\n").as_bytes(),
            &mut out,
            |_| {
                seen += 1;
                Err(Failure::transient("cancel failed"))
            },
        );
        assert_eq!(seen, 2);
        assert_eq!(status, ExitStatus::TimedOut);
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], failed);
        assert!(
            lines[1].contains(r#""stage":"alloc","kind":"transient""#),
            "{out}"
        );
    }
}
