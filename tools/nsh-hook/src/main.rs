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
    let code = if argv.get(1).map(String::as_str) == Some("--check") {
        check::main(&argv)
    } else {
        nsh_core::build_hook::main(&argv)
    };
    std::process::exit(code);
}
