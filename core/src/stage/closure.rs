//! `nsh-closure`: what a derivation's build needs, as a ticket.
//!
//! For each derivation (named on the command line, or on stdin as a `.drv`
//! path or a ticket with `drv.path`), writes a ticket with
//! `drv{path,name,system,features,outputs,wanted,resources}`,
//! `store{dir,uri}` and `closure{paths,nar_size}`: the input closure the node
//! needs, which is inputSrcs ∪ the used outputs of every input derivation,
//! closed under references in the local store, in dependency order.
//!
//! All tickets of one run share one `nix-store --serve` process.

use std::io::{self, BufRead, BufReader, Read, Write};

use crate::error::Failure;
use crate::exit::ExitStatus;
use crate::nix::local_store::{self, LocalStore};
use crate::nix::serve::client::ServeProcess;
use crate::ticket::{ClosureSection, DrvSection, StoreSection, Ticket};
use crate::tool::run_stage;
use crate::{log_debug, log_error, log_info};

/// What `nsh-closure` is asked to do.
#[derive(Debug, Clone, Default)]
pub struct ClosureOptions {
    /// `.drv` paths from the command line; empty: read stdin.
    pub drvs: Vec<String>,
    /// Output names (`--wanted out,dev`); empty: the ticket's, else all.
    pub wanted: Vec<String>,
    /// `--store`: overrides the ticket's `store.uri`.
    pub store_uri: Option<String>,
    /// The directory holding `nix-store` (empty: PATH).
    pub nix_bin_dir: String,
}

/// Runs the stage: tickets (or .drv paths) in, tickets out.
pub fn run<R: BufRead, W: Write>(options: &ClosureOptions, stdin: R, stdout: W) -> ExitStatus {
    let mut session = Session {
        options,
        serve: None,
    };
    let stage = |ticket: &mut Ticket| session.ticket(ticket);
    if options.drvs.is_empty() {
        let input = BufReader::new(PathLines {
            inner: stdin,
            options,
            buf: Vec::new(),
            pos: 0,
        });
        run_stage("closure", input, stdout, stage)
    } else {
        let lines: String = options
            .drvs
            .iter()
            .map(|path| path_ticket(options, path) + "\n")
            .collect();
        run_stage("closure", lines.as_bytes(), stdout, stage)
    }
}

impl ClosureOptions {
    /// The local store's URI: `--store`, else the ticket's `store.uri`,
    /// else Nix's default.
    fn store_uri(&self, ticket: &Ticket) -> String {
        self.store_uri
            .clone()
            .filter(|uri| !uri.is_empty())
            .unwrap_or_else(|| ticket.store_uri().to_string())
    }
}

struct Session<'a> {
    options: &'a ClosureOptions,
    /// One serve process for the whole run, for one store URI.
    serve: Option<(String, ServeProcess)>,
}

impl Session<'_> {
    fn ticket(&mut self, ticket: &mut Ticket) -> Result<(), Failure> {
        let drv_section = ticket.need_drv()?;
        let drv_path = drv_section.path.clone();
        let uri = self.options.store_uri(ticket);
        let wanted = if self.options.wanted.is_empty() {
            drv_section.wanted.clone()
        } else {
            self.options.wanted.clone()
        };

        let local = LocalStore::new(&uri, &self.options.nix_bin_dir)?;
        let drv = local.read_drv(&drv_path)?;
        let wanted = drv.wanted_outputs(&wanted)?;
        // The derivation's facts go in first, so that a ticket that fails
        // on its inputs still says what the derivation is.
        let extra = ticket.drv.take().map(|d| d.extra).unwrap_or_default();
        ticket.drv = Some(DrvSection {
            extra,
            ..drv.section(wanted)
        });
        let store_extra = ticket.store.take().map(|s| s.extra).unwrap_or_default();
        ticket.store = Some(StoreSection {
            dir: local.dir.to_string(),
            uri,
            extra: store_extra,
        });

        let roots = local.input_roots(&drv)?;
        log_debug!("{drv_path}: {} input roots", roots.len());

        let serve = self.serve_for(&local)?;
        let closure = match local_store::input_closure(&mut serve.client, &roots) {
            Ok(closure) => closure,
            Err(failure) => {
                if failure.kind != crate::Kind::Input {
                    // The connection may be broken: start afresh next time.
                    self.serve = None;
                }
                return Err(failure.context(format!("input closure of {drv_path}")));
            }
        };
        log_info!(
            "{drv_path}: {} input paths, {} bytes",
            closure.paths.len(),
            closure.nar_size
        );

        let closure_extra = ticket.closure.take().map(|c| c.extra).unwrap_or_default();
        ticket.closure = Some(ClosureSection {
            paths: closure.paths,
            nar_size: closure.nar_size,
            extra: closure_extra,
        });
        Ok(())
    }

    fn serve_for(&mut self, local: &LocalStore) -> Result<&mut ServeProcess, Failure> {
        if self
            .serve
            .as_ref()
            .is_some_and(|(uri, _)| *uri != local.uri)
        {
            self.serve = None;
        }
        let serve = match self.serve.take() {
            Some(serve) => serve,
            None => (local.uri.clone(), local.serve(false)?),
        };
        Ok(&mut self.serve.insert(serve).1)
    }
}

/// A path outside the store that is a symlink into it (a GC root made by
/// `nix-instantiate --add-root`) stands for the store path it points to.
/// Anything else is returned as it is, to be judged by the store.
fn resolve_link(local: &LocalStore, path: &str) -> String {
    let in_store = path.starts_with(&format!("{}/", local.dir));
    if in_store || local.real_dir().as_os_str() != local.dir.as_str() {
        return path.to_string();
    }
    match std::fs::canonicalize(path) {
        Ok(target) => match target.to_str() {
            Some(target) if target.starts_with(&format!("{}/", local.dir)) => {
                log_debug!("{path} is {target}");
                target.to_string()
            }
            _ => path.to_string(),
        },
        Err(_) => path.to_string(),
    }
}

/// A fresh ticket naming the derivation at `path` (a `.drv` store path,
/// or a link to one): or, when `path` is not one, a ticket with the
/// failure and the line under `input`, as the stage loop writes for a line
/// that is not a ticket.
fn path_ticket(options: &ClosureOptions, path: &str) -> String {
    let mut ticket = Ticket::new();
    let drv_path = LocalStore::new(&options.store_uri(&ticket), &options.nix_bin_dir)
        .and_then(|local| local.dir.parse(&resolve_link(&local, path)));
    match drv_path {
        Ok(drv_path) => ticket.drv = Some(DrvSection::new(drv_path)),
        Err(failure) => {
            log_error!("{failure}");
            ticket.fail("closure", &failure);
            ticket.extra.insert("input".into(), path.into());
        }
    }
    ticket.to_line()
}

/// Stdin with every line that is not a ticket (does not start with `{`)
/// read as a `.drv` path and turned into a ticket naming it.
struct PathLines<'a, R> {
    inner: R,
    options: &'a ClosureOptions,
    buf: Vec<u8>,
    pos: usize,
}

impl<R: BufRead> Read for PathLines<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
            let mut line = String::new();
            if self.inner.read_line(&mut line)? == 0 {
                return Ok(0);
            }
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('{') {
                self.buf.extend_from_slice(line.as_bytes());
            } else {
                self.buf
                    .extend_from_slice(path_ticket(self.options, trimmed).as_bytes());
                self.buf.push(b'\n');
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_become_tickets_and_tickets_stay() {
        let a = "/s/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-a.drv";
        let b = "/s/1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b-b.drv";
        let input = format!("{a}\n\n{{\"v\":1,\"x\":2}}\n  {b}  \n/etc/passwd\n");
        let options = ClosureOptions {
            store_uri: Some("local?store=/s".into()),
            ..ClosureOptions::default()
        };
        let mut out = String::new();
        PathLines {
            inner: input.as_bytes(),
            options: &options,
            buf: Vec::new(),
            pos: 0,
        }
        .read_to_string(&mut out)
        .unwrap();
        let ticket = |path: &str| {
            format!("{{\"v\":1,\"drv\":{{\"path\":\"{path}\",\"name\":\"\",\"system\":\"\",\"features\":[],\"outputs\":{{}},\"wanted\":[]}}}}\n")
        };
        let not_one = "{\"v\":1,\"error\":{\"stage\":\"closure\",\"kind\":\"input\",\"message\":\"\\\"/etc/passwd\\\" is not in the store directory /s\"},\"input\":\"/etc/passwd\"}\n";
        assert_eq!(
            out,
            format!("{}\n{{\"v\":1,\"x\":2}}\n{}{not_one}", ticket(a), ticket(b))
        );
    }

    #[test]
    fn a_bad_path_is_an_error_ticket_and_65() {
        let options = ClosureOptions {
            drvs: vec!["/etc/passwd".into()],
            store_uri: Some("local?store=/tmp/nsh-nonexistent/store".into()),
            ..ClosureOptions::default()
        };
        let mut out = Vec::new();
        let status = run(&options, &b""[..], &mut out);
        assert_eq!(status, ExitStatus::BadInput);
        let ticket = Ticket::from_line(std::str::from_utf8(&out).unwrap()).unwrap();
        let error = ticket.error.unwrap();
        assert_eq!(error.stage, "closure");
        assert_eq!(
            error.message,
            "\"/etc/passwd\" is not in the store directory /tmp/nsh-nonexistent/store"
        );
    }
}
