# The demo's derivation DAG: a few derivations with dependencies, one of them
# needing the system feature `big` that only the cluster's node2 has. Every
# output records the host it was built on, and its inputs' records, so the
# final output tells where each derivation of the DAG was built.
#
#   nix-build tests/demo/dag.nix --argstr salt "$(date +%s)"
#
# `salt` makes every run's derivations new (nothing is already built).
{ salt ? "" }:
let
  step = name: deps: extra: builtins.derivation ({
    inherit name salt deps;
    PATH = "/usr/bin:/bin";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ''
      read host < /proc/sys/kernel/hostname
      echo "$name: building on $host, inputs: $deps"
      {
        echo "$name: built on $host"
        for d in $deps; do cat "$d"; done
      } > "$out"
    '' ];
  } // extra);

  source = step "nsh-demo-source" [ ] { };
  left = step "nsh-demo-left" [ source ] { };
  right = step "nsh-demo-right" [ source ] { };
  heavy = step "nsh-demo-heavy" [ left right ] { requiredSystemFeatures = [ "big" ]; };
in
step "nsh-demo-result" [ heavy left ] { }
