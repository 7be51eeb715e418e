#!/bin/sh
# A pipeline command (hook.pipeline) for nsh-hook that builds the derivation on this machine,
# the way nsh's tools bring outputs back (reference/nix-build-hook.md,
# "Importing outputs"): the daemon holds the output locks, so the builder is
# run by hand, its output canonicalised and registered with `nix-store
# --load-db` — no lock is taken. Only for the tests: simple derivations,
# sandbox off, outputs without references.
set -u
log=${NSH_LOG_FD:-2}
read -r ticket
drv=$(printf '%s\n' "$ticket" | jq -r .drv.path)
printf '%s\n' "$drv" >> "${NSH_TEST_RECORD:-/dev/null}"
fail() {
  printf '%s\n' "$ticket" | jq -c --arg m "$1" '.error = {stage: "run", kind: "permanent", message: $m}'
  exit 1
}
# The derivation's JSON: Nix up to 2.33 writes {"<drv path>": {…}}; 2.34
# writes {"derivations": {"<drv name>": {…}}, "version": 4}, with output
# paths as base names. The environment has every output's absolute path.
shown=$(nix show-derivation "$drv") || fail "nix show-derivation failed"
json=$(printf '%s' "$shown" | jq '(.derivations // .) | .[]') || fail "unexpected JSON"
build=$(mktemp -d)
# `env -i NAME=value… builder args…`, shell-quoted by jq.
cmd=$(printf '%s' "$json" | jq -r --arg top "$build" '
  ["env", "-i", "NIX_BUILD_TOP=\($top)", "TMPDIR=\($top)", "HOME=/homeless-shelter"]
  + (.env | to_entries | map("\(.key)=\(.value)")) + [.builder] + .args | @sh')
outputs=$(printf '%s' "$json" | jq -c '.env as $env | .outputs | with_entries(.value = $env[.key])')
outs=$(printf '%s' "$outputs" | jq -r '.[]')
if ! (cd "$build" && eval "$cmd") >&"$log" 2>&1; then
  for out in $outs; do rm -rf "$out"; done
  fail "the builder failed"
fi
for out in $outs; do
  find "$out" -exec chmod a-w {} + -exec touch -h -d @1 {} +
  hash=$(nix-store --dump "$out" | sha256sum | cut -d' ' -f1)
  size=$(nix-store --dump "$out" | wc -c)
  printf '%s\n%s\n%s\n%s\n0\n' "$out" "$hash" "$size" "$drv" | nix-store --load-db
done
rm -rf "$build"
printf '%s\n' "$ticket" | jq -c --argjson o "$outputs" '.drv.outputs = $o'
