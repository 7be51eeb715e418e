//! The waiting display on a terminal: a spinner with the job's state and
//! pending reason. Without a terminal, `LogProgress` logs changes instead.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use nsh_core::slurm::JobInfo;
use nsh_core::stage::alloc::{describe_wait, Progress};

pub struct Spinner {
    bar: Option<ProgressBar>,
}

impl Spinner {
    pub fn new() -> Spinner {
        Spinner { bar: None }
    }
}

impl Progress for Spinner {
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
