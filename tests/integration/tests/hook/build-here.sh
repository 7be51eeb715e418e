#!/bin/sh
# A pipeline command (hook.pipeline) for nsh-hook that builds the derivation on this machine,
# the way nsh's tools bring outputs back (docs/reference/nix-build-hook.md,
# "Importing outputs while the daemon holds their locks"): the daemon holds the
# output locks, so the builder is
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
# `nix derivation show` (2.15+; `show-derivation` is its old name). From
# Nix 2.33 the JSON is `{"derivations": {NAME: …}, "version": 4}` and output
# paths are base names; before, `{PATH: …}` with full paths. Normalised here
# to the one derivation, with full output paths.
store=$(dirname "$drv")
json=$(nix derivation show "$drv" 2>/dev/null || nix show-derivation "$drv") || fail "nix derivation show failed"
json=$(printf '%s' "$json" | jq -c --arg store "$store" '(.derivations // .) | to_entries[0].value
  | .outputs |= map_values(.path |= (if startswith("/") then . else "\($store)/\(.)" end))') ||
  fail "cannot read the derivation's JSON"
build=$(mktemp -d)
# `env -i NAME=value… builder args…`, shell-quoted by jq.
cmd=$(printf '%s' "$json" | jq -r --arg top "$build" '
  ["env", "-i", "NIX_BUILD_TOP=\($top)", "TMPDIR=\($top)", "HOME=/homeless-shelter"]
  + (.env | to_entries | map("\(.key)=\(.value)")) + [.builder] + .args | @sh')
outs=$(printf '%s' "$json" | jq -r '.outputs | to_entries[] | .value.path')
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
printf '%s\n' "$ticket" | jq -c --argjson o "$(printf '%s' "$json" | jq '.outputs | map_values(.path)')" '.drv.outputs = $o'
