//! `nsh-hook`: set Nix's `build-hook` to this binary. The logic is
//! `nsh_core::hook`; `nsh-hook --check` (the doctor) is `nsh_core::hook::check`,
//! its command line and output are here, and so is the command its man page
//! and completions are made from (`nsh-hook --generate man|bash|zsh|fish`).

mod check;

fn main() {
    let argv_os: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(code) = nsh_cli::generate_if_asked(&argv_os, check::manual_command) {
        std::process::exit(code);
    }
    let argv: Vec<String> = std::env::args().collect();
    // A panic must not end the hook with Rust's 101, which Nix reads as
    // "timed out": it is an internal error (70), after the build's guards
    // have dropped (jobs cancelled, temporary files removed).
    let code = std::panic::catch_unwind(|| {
        if argv.get(1).map(String::as_str) == Some("--check") {
            check::main(&argv)
        } else {
            // Failures the stages did not record (`docs/nsh-status.md`).
            nsh_core::record_builds();
            nsh_core::build_hook::main(&argv)
        }
    })
    .unwrap_or(nsh_core::ExitStatus::Internal.code());
    std::process::exit(code);
}
