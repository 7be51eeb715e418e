//! `nsh-hook`: set Nix's `build-hook` to this binary. The logic is
//! `nsh_core::hook`.

fn main() {
    let code = nsh_core::hook::main(std::env::args().collect());
    std::process::exit(code);
}
