#!/bin/sh
# Benchmark: nsh-closure against `nix-store --query --requisites` on a
# generated closure of several thousand store paths.
#
#   tests/bench/closure.sh [N]        (N source files, default 5000)
#
# The closure is made of N `builtins.toFile` sources that refer to earlier
# ones (i-1 for the first 50, then i-50, i/2 and i/3), so that it is a real
# DAG with ~3N references, and one derivation whose inputs are the last 50:
# no build is needed, only evaluation. Everything lives in a private store
# under $BENCH_DIR (default /tmp/nsh-bench), kept between runs so that only
# the first run pays for generation.
set -eu

N=${1:-5000}
BENCH_DIR=${BENCH_DIR:-/tmp/nsh-bench}
ROOT=$BENCH_DIR/n$N
URI="local?store=$ROOT/store&state=$ROOT/var&log=$ROOT/log"
export NIX_CONFIG='substituters =
build-users-group =
sandbox = false
builders ='
export NSH_LOG=error
HERE=$(cd "$(dirname "$0")/../.." && pwd)
NSH_CLOSURE=${NSH_CLOSURE:-$HERE/target/release/nsh-closure}
if [ ! -x "$NSH_CLOSURE" ]; then
    (cd "$HERE" && cargo build --release -q -p nsh-closure)
fi

mkdir -p "$ROOT"
if [ ! -f "$ROOT/drv" ]; then
    start=$(date +%s)
    {
        echo 'let'
        i=0
        while [ "$i" -lt "$N" ]; do
            if [ "$i" -eq 0 ]; then
                echo "  f0 = builtins.toFile \"f0\" \"leaf\";"
            elif [ "$i" -le 50 ]; then
                echo "  f$i = builtins.toFile \"f$i\" \"\${f$((i - 1))}\";"
            else
                echo "  f$i = builtins.toFile \"f$i\" \"\${f$((i - 50))} \${f$((i / 2))} \${f$((i / 3))}\";"
            fi
            i=$((i + 1))
        done
        printf 'in builtins.derivation { name = "bench"; system = "x86_64-linux"; builder = "/bin/sh";\n'
        printf '  args = [ "-c" "echo > $out" ]; inputs = ['
        i=$((N - 50))
        [ "$i" -lt 0 ] && i=0
        while [ "$i" -lt "$N" ]; do printf ' f%d' "$i"; i=$((i + 1)); done
        printf ' ]; }\n'
    } > "$ROOT/bench.nix"
    nix-instantiate --store "$URI" "$ROOT/bench.nix" 2>/dev/null > "$ROOT/drv.tmp"
    mv "$ROOT/drv.tmp" "$ROOT/drv"
    echo "generated $N paths in $(( $(date +%s) - start )) s" >&2
fi
DRV=$(cat "$ROOT/drv")
ROOTS=$(nix-store --store "$URI" --query --references "$DRV")

# Best of 5 wall-clock runs, in milliseconds.
best_ms() {
    best=
    for _ in 1 2 3 4 5; do
        t0=$(date +%s%N)
        sh -c "$1" > /dev/null
        t1=$(date +%s%N)
        ms=$(( (t1 - t0) / 1000000 ))
        if [ -z "$best" ] || [ "$ms" -lt "$best" ]; then best=$ms; fi
    done
    echo "$best"
}

paths=$("$NSH_CLOSURE" --store "$URI" "$DRV" | sed 's/.*"paths":\[\([^]]*\)\].*/\1/' | tr ',' '\n' | wc -l)
requisites=$(nix-store --store "$URI" --query --requisites $ROOTS | wc -l)
if [ "$paths" -ne "$requisites" ]; then
    echo "MISMATCH: nsh-closure found $paths paths, nix-store --query --requisites $requisites" >&2
    exit 1
fi

t_nsh=$(best_ms "'$NSH_CLOSURE' --store '$URI' '$DRV'")
t_req=$(best_ms "nix-store --store '$URI' --query --requisites $(echo $ROOTS)")
t_size=$(best_ms "nix-store --store '$URI' --query --requisites $(echo $ROOTS) | xargs nix-store --store '$URI' --query --size")

printf '| command | paths | best of 5 (ms) |\n|---|---:|---:|\n'
printf '| `nsh-closure DRV` (closure, NAR sizes, dependency order, ticket) | %d | %d |\n' "$paths" "$t_nsh"
printf '| `nix-store --query --requisites ROOTS` (closure only) | %d | %d |\n' "$requisites" "$t_req"
printf '| `nix-store -qR ROOTS \\| xargs nix-store -q --size` (closure + sizes) | %d | %d |\n' "$requisites" "$t_size"
