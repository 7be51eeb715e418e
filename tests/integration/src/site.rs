//! A test's own site: a configuration and an nsh runtime directory (so a
//! pool) no other test shares, and the Slurm jobs it saw, let go when the
//! test ends whatever happened.

use std::cell::RefCell;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{nsh_tool, slurm_cmd, Cluster};

/// One test's configuration, runtime directory and jobs.
pub struct PrivateSite {
    /// The cluster it uses.
    pub c: Cluster,
    /// Holds `nsh.toml` and the runtime directory `run/`; readable by any
    /// user, so that tests running tools as another user can use it.
    pub dir: tempfile::TempDir,
    /// Its `nsh.toml`.
    pub config: PathBuf,
    jobs: RefCell<Vec<u64>>,
}

impl PrivateSite {
    /// The cluster's configuration with `cluster_keys` in `[cluster.test]`
    /// and `remote_keys` in `[remote]` (one `key = value` per line), each
    /// replacing the cluster's own line for that key.
    pub fn new(prefix: &str, cluster_keys: &str, remote_keys: &str) -> PrivateSite {
        let c = Cluster::get();
        let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let text = std::fs::read_to_string(c.nsh_config()).unwrap();
        let text = with_keys(&text, "[cluster.test]", cluster_keys);
        let text = with_keys(&text, "[remote]", remote_keys);
        let config = dir.path().join("nsh.toml");
        std::fs::write(&config, text).unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
        PrivateSite {
            c,
            dir,
            config,
            jobs: RefCell::new(Vec::new()),
        }
    }

    /// The site's `NSH_RUNTIME_DIR`.
    pub fn runtime(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// A tool with this site's configuration and runtime directory.
    pub fn tool(&self, name: &str) -> Command {
        let mut cmd = self.c.command(nsh_tool(name));
        cmd.env("NSH_CONFIG", &self.config)
            .env("NSH_RUNTIME_DIR", self.runtime());
        cmd
    }

    /// Notes a job to cancel when the test ends.
    pub fn note_job(&self, job: u64) {
        self.jobs.borrow_mut().push(job);
    }

    /// Closes this site's ssh masters: nothing of nsh is left running on
    /// the login side.
    pub fn stop_masters(&self) {
        let Ok(entries) = std::fs::read_dir(self.runtime().join("ssh")) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.extension().is_some() || !is_socket(&path) {
                continue;
            }
            let _ = Command::new("ssh")
                .args(["-F", &self.c.ssh_config(), "-o"])
                .arg(format!("ControlPath={}", path.display()))
                .args(["-O", "exit", "node"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for PrivateSite {
    fn drop(&mut self) {
        let _ = self.tool("nsh-alloc").arg("--pool-drain").output();
        for job in self.jobs.borrow().iter() {
            let _ = slurm_cmd(&self.c, "scancel", &[&job.to_string()]);
        }
        self.stop_masters();
    }
}

/// `text` with `keys` (one `key = value` per line) first in `section`, and
/// the lines that set any of those keys elsewhere removed.
fn with_keys(text: &str, section: &str, keys: &str) -> String {
    if keys.trim().is_empty() {
        return text.to_string();
    }
    let key_of = |line: &str| line.split('=').next().map(str::trim).map(String::from);
    let ours: Vec<String> = keys.lines().filter_map(key_of).collect();
    let mut out = String::new();
    let mut placed = false;
    for line in text.lines() {
        if key_of(line).is_some_and(|k| line.contains('=') && ours.contains(&k)) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if line == section && !placed {
            out.push_str(keys.trim_end());
            out.push('\n');
            placed = true;
        }
    }
    assert!(placed, "no {section} in the cluster's nsh.toml");
    out
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}
