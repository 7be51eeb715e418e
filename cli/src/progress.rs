//! Progress on a terminal: a bar for bytes copied (`nsh-push`,
//! `nsh-fetch`) and a spinner while a Slurm job waits (`nsh-alloc`). Without
//! a terminal the library's log-line progress is used instead.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use nsh_core::progress::JobInfo;
use nsh_core::progress::{
    describe_wait, LogQueueProgress, LogTransferProgress, QueueProgress, TransferProgress,
};

/// A bar on a terminal, log lines otherwise. `what`: the verb
/// (`pushed`, `fetched`).
pub fn for_transfer(what: &'static str) -> Box<dyn TransferProgress> {
    if std::io::stderr().is_terminal() {
        Box::new(TransferBar::new(what))
    } else {
        Box::new(LogTransferProgress::new(what))
    }
}

/// A spinner on a terminal, log lines when the job's state changes
/// otherwise.
pub fn for_queue_wait() -> Box<dyn QueueProgress> {
    if std::io::stderr().is_terminal() {
        Box::new(QueueSpinner { bar: None })
    } else {
        Box::new(LogQueueProgress::new())
    }
}

/// A progress bar of bytes, with paths counted in its message.
pub struct TransferBar {
    bar: ProgressBar,
    what: &'static str,
    paths: u64,
    total_paths: u64,
}

impl TransferBar {
    /// A bar that shows nothing until [`TransferProgress::begin`].
    #[must_use]
    pub fn new(what: &'static str) -> TransferBar {
        TransferBar {
            bar: ProgressBar::hidden(),
            what,
            paths: 0,
            total_paths: 0,
        }
    }
}

impl TransferProgress for TransferBar {
    fn begin(&mut self, paths: u64, bytes: u64) {
        let bar = ProgressBar::new(bytes);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(self.what);
        bar.set_message(format!("0/{paths} paths"));
        self.bar = bar;
        self.total_paths = paths;
    }
    fn bytes(&mut self, n: u64) {
        self.bar.inc(n);
    }
    fn path_done(&mut self) {
        self.paths += 1;
        self.bar
            .set_message(format!("{}/{} paths", self.paths, self.total_paths));
    }
    fn end(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// The waiting display: a spinner with the job's state and pending reason.
struct QueueSpinner {
    bar: Option<ProgressBar>,
}

impl QueueProgress for QueueSpinner {
    fn waiting(&mut self, job: u64, info: &JobInfo, waited: Duration) {
        let bar = self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("nsh-alloc: {spinner} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        bar.set_message(format!(
            "job {job}: {} for {} s",
            describe_wait(info),
            waited.as_secs()
        ));
    }

    fn done(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
