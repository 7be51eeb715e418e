//! `nsh-hook`: set Nix's `build-hook` to this binary. The logic is
//! `nsh_core::hook`; `nsh-hook --check` (the doctor) is `nsh_core::hook::check`,
//! its command line and output are here.

mod check;

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let code = if argv.get(1).map(String::as_str) == Some("--check") {
        check::main(&argv)
    } else {
        nsh_core::build_hook::main(&argv)
    };
    std::process::exit(code);
}
