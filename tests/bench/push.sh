#!/usr/bin/env bash
# Benchmark: nsh-push against nix-copy-closure --to and nix copy --to ssh://
# on the same closure, in the same run, into a node of the test cluster.
#
#   tests/bench/push.sh [PATHS [BYTES_PER_PATH [NODE]]]     (default 2000 512KiB node2)
#
# Needs the test cluster (tests/cluster/cluster up) and a release build of
# nsh-push (built here). The closure is made fresh (salted) in the local store:
# PATHS leaves of random data plus one root that refers to all of them.
#
# Between runs the closure is deleted from the node's store with
# `nix-store --delete` (as the build account, through Nix's GC lock), so every
# run starts from a store without any of its paths, and nothing else on the
# node is touched: other tests may use the node meanwhile.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
paths=${1:-2000}
size=${2:-524288}
node=${3:-node2}
state=${NSH_CLUSTER_DIR:-/tmp/nsh-cluster}
# shellcheck disable=SC1091
. "$state/env"
ssh_node() { ssh -F "$state/ssh/config" "$node" "$@"; }

cargo build --release -q -p nsh-push
push_bin=$root/target/release/nsh-push

work=$(mktemp -d /tmp/nsh-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
# The transport is measured, not the pool: with `linger = 0` nsh-push asks
# the node every time (with the pool on, it would skip a push the pool knows
# to be done, and the wipes below would make its record wrong).
sed 's/^\[cluster\.test\]$/[cluster.test]\nlinger = 0/' "$NSH_CONFIG" > "$work/nsh.toml"
# The same with ssh's own cipher choice (`[ssh] ciphers = ""`), to show what
# nsh's default (AES-GCM first on a CPU with AES instructions) saves.
sed 's/^\[ssh\]$/[ssh]\nciphers = ""/' "$work/nsh.toml" > "$work/nsh-ssh-ciphers.toml"
grep -q '^ciphers = ""' "$work/nsh-ssh-ciphers.toml" ||
    { echo "bench: no [ssh] section in $NSH_CONFIG" >&2; exit 1; }
export NSH_CONFIG=$work/nsh.toml
# A runtime dir of its own: its ssh masters are the ones closed below.
runtime=$work/run
export NSH_RUNTIME_DIR=$runtime
salt=$(date +%s%N)
cat > "$work/closure.nix" <<NIX
let
  leaf = n: builtins.derivation {
    name = "nsh-bench-$salt-\${toString n}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" "head -c $size /dev/urandom > \$out" ];
  };
  leaves = builtins.genList leaf $paths;
in builtins.derivation {
  name = "nsh-bench-$salt-root";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  leaves = leaves;
  passAsFile = [ "leaves" ];
  args = [ "-c" "cp \$leavesPath \$out" ];
}
NIX
t0=$(date +%s.%N)
out=$(nix-build --no-out-link --max-jobs 4 --quiet "$work/closure.nix" 2>"$work/build.log") ||
    { cat "$work/build.log" >&2; exit 1; }
nix-store -qR "$out" > "$work/closure"
count=$(wc -l < "$work/closure")
bytes=$(nix-store -q --size $(cat "$work/closure") | awk '{s+=$1} END {print s}')
printf 'closure: %s paths, %s bytes (NAR), built in %.1fs\n' "$count" "$bytes" \
    "$(echo "$(date +%s.%N) - $t0" | bc)" >&2

ticket() {
    jq -cn --rawfile paths "$work/closure" --arg node "$node" --argjson job "$1" '{
        v: 1, store: {dir: "/nix/store", uri: "local"},
        closure: {paths: ($paths | split("\n") | map(select(. != ""))), nar_size: 0},
        alloc: {cluster: "test", backend: "rest", job: $job, node: $node, ssh: $node,
                work: "/tmp/nsh/nsh-\($job)"}}'
}

# Path lists go on stdin: 2000 paths on one command line exceed the kernel's
# limit for the one string ssh hands to the remote shell.
wipe() {
    # Dependents first: the root, then the leaves.
    tac "$work/closure" | ssh_node 'xargs nix-store --delete' > /dev/null 2>&1 || true
    local invalid
    invalid=$(ssh_node 'xargs nix-store --check-validity --print-invalid' < "$work/closure" | wc -l)
    if [ "$invalid" -ne "$count" ]; then
        echo "bench: could not remove the closure from $node" >&2; exit 1
    fi
}

check() {
    ssh_node 'xargs nix-store --check-validity' < "$work/closure" ||
        { echo "bench: $1 left the closure incomplete on $node" >&2; exit 1; }
}

# Every command runs ROUNDS times (interleaved, so that the machine's other
# load spreads over all of them); the table shows the median and the best.
rounds=${ROUNDS:-3}
declare -A times cpus
declare -a names
# CPU seconds the whole machine spent busy (every process: both ends of the
# copy run here, the node's sshd and nix-store included).
busy() { awk '/^cpu / {print ($2 + $3 + $4 + $7 + $8) / 100}' /proc/stat; }
timed() { # name command...
    local name=$1; shift
    local start end cpu0 cpu1
    cpu0=$(busy)
    start=$(date +%s.%N)
    "$@" > "$work/out" 2> "$work/err" || { cat "$work/err" >&2; exit 1; }
    end=$(date +%s.%N)
    cpu1=$(busy)
    [ -n "${times[$name]:-}" ] || names+=("$name")
    times[$name]="${times[$name]:-} $(echo "$end - $start" | bc)"
    cpus[$name]="${cpus[$name]:-} $(echo "$cpu1 - $cpu0" | bc)"
}

median_of() { # list of numbers
    local sorted
    sorted=$(tr ' ' '\n' <<< "$1" | grep . | sort -g)
    sed -n "$(( ($(wc -l <<< "$sorted") + 1) / 2 ))p" <<< "$sorted"
}
row() { # name
    local name=$1 median best mbs cpu
    best=$(tr ' ' '\n' <<< "${times[$name]}" | grep . | sort -g | head -1)
    median=$(median_of "${times[$name]}")
    cpu=$(median_of "${cpus[$name]}")
    mbs=-
    case $name in *again*) ;; *) mbs=$(echo "scale=1; $bytes / 1048576 / $median" | bc) ;; esac
    printf '| %-46s | %8.2f | %8.2f | %8s | %8.2f |\n' "$name" "$median" "$best" "$mbs" "$cpu"
}

# The node's ssh masters nsh-push started (one per node, shared by every job
# there: `<runtime dir>/ssh/test-<destination>`).
close_master() {
    local socket
    for socket in "$runtime"/ssh/test-*; do
        [ -S "$socket" ] || continue
        ssh -o "ControlPath=$socket" -O exit "$node" 2>/dev/null || true
    done
}

nsh_push() { # job [args]
    local job=$1; shift
    ticket "$job" | NSH_LOG=warn "$push_bin" "$@"
}

nsh_push_ssh_ciphers() { # job [args]
    NSH_CONFIG=$work/nsh-ssh-ciphers.toml nsh_push "$@"
}

sshopts="-F $state/ssh/config"

for round in $(seq "$rounds"); do
    echo "round $round of $rounds" >&2
    job=$((RANDOM * 1000 + 800000000))

    wipe
    timed "nsh-push (default --method auto)" nsh_push $((job + 1))
    check nsh-push
    jq -e --argjson n "$count" '.push.copied == $n' "$work/out" > /dev/null ||
        { echo "bench: nsh-push did not copy every path: $(cat "$work/out")" >&2; exit 1; }
    timed "nsh-push again (all present)" nsh_push $((job + 1))
    jq -e '.push.bytes == 0' "$work/out" > /dev/null || { echo "bench: re-push moved bytes" >&2; exit 1; }
    close_master $((job + 1))
    # As nsh-hook runs it today: a new job, so a new ssh connection.
    timed "nsh-push again (all present, new ssh connection)" nsh_push $((job + 4))
    close_master $((job + 4))

    wipe
    timed "nsh-push, ssh's own cipher (ciphers = \"\")" nsh_push_ssh_ciphers $((job + 5))
    check "nsh-push, ssh's own cipher"
    close_master

    wipe
    timed "nsh-push --method import-export" nsh_push $((job + 2)) --method import-export
    check "nsh-push --method import-export"
    close_master $((job + 2))

    wipe
    timed "nsh-push --method add-to-store-nar" nsh_push $((job + 3)) --method add-to-store-nar
    check "nsh-push --method add-to-store-nar"
    close_master $((job + 3))

    wipe
    timed "nix-copy-closure --to" env NIX_SSHOPTS="$sshopts" nix-copy-closure --to "$node" "$out"
    check nix-copy-closure
    timed "nix-copy-closure --to again (all present)" env NIX_SSHOPTS="$sshopts" nix-copy-closure --to "$node" "$out"

    # What nsh's cipher choice gives, given to nix-copy-closure by hand.
    wipe
    timed "nix-copy-closure --to, NIX_SSHOPTS=\"-c aes128-gcm…\"" \
        env NIX_SSHOPTS="$sshopts -c aes128-gcm@openssh.com" nix-copy-closure --to "$node" "$out"
    check "nix-copy-closure with AES-GCM"

    wipe
    timed "nix copy --to ssh://" env NIX_SSHOPTS="$sshopts" nix copy --to "ssh://$node" "$out"
    check "nix copy"
    timed "nix copy --to ssh:// again (all present)" env NIX_SSHOPTS="$sshopts" nix copy --to "ssh://$node" "$out"
done
wipe

echo
echo "closure: $count paths, $(echo "scale=1; $bytes / 1048576" | bc) MiB NAR; node $node; $rounds rounds; $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr), $(nix-store --version 2>/dev/null)"
echo
echo "| what                                           | median s |   best s | MiB/s (median) | CPU s, all processes (median) |"
echo "|------------------------------------------------|---------:|---------:|---------:|---------:|"
for name in "${names[@]}"; do row "$name"; done
