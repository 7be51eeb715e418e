#!/usr/bin/env bash
# Benchmark: one derivation DAG built (a) locally, (b) through Nix's own
# ssh:// remote builder on the test cluster's nodes, (c) through nsh-hook
# (Slurm jobs on the same nodes), on the local store and through the local
# nix-daemon; each remote mode once more with every output deleted locally
# but present on the nodes (a rebuild: pure overhead, nothing to build).
# The nsh modes reuse jobs (the pool, docs/pool.md, with the cluster's
# linger); the -1job modes run one Slurm job per build (linger = 0).
#
#   tests/bench/dag.sh [MODE...]
#
# MODE is any of: local ssh ssh-rebuild nsh nsh-rebuild nsh-1job nsh-daemon
# nsh-daemon-rebuild nsh-daemon-1job (default: all of them; the nsh modes are
# skipped, with a message, when the nsh tools cannot be built). Run it as root on a machine
# where the test cluster is up (tests/cluster/cluster up); it prints a
# Markdown table of results and keeps every log under $BENCH_DIR
# (default /tmp/nsh-bench-dag/<date>).
#
# Knobs (environment): DAG_WIDTH (9) × DAG_DEPTH (6) small derivations, each
# depending on 3 of the layer before; BIG_MB (30) MiB per large output (three
# of them, one needing the feature `big`, which only node2 has); JOBS (8)
# builds at a time in every mode (= Nix's slots on the two nodes, 4 each, and
# the cluster's max_jobs); LINGER (the cluster's, else 60) for the reuse
# modes; NSH_LOG (warn) for the tools, whose lines land,
# time-stamped, in each mode's nix.log; NSH_BIN (default: target/release of this repo,
# built if missing) holds the nsh-* tools.
#
# What is measured, per mode:
# * wall time of `nix-build`;
# * per build, from Nix's own activity "building '…' on '<machine>'": it
#   starts when the hook accepts and stops when the outputs are valid in the
#   local store, so it is the whole remote-build cost as Nix sees it
#   (nix-build --log-format internal-json, each line stamped as it arrives);
# * for nsh, each final ticket (NSH_TICKET_LOG): the hook's clock at each
#   stage's ticket (closure, alloc = the Slurm queue, push, run, fetch),
#   Slurm's own queue time (alloc.secs.queued), push.bytes and fetch.bytes;
# * bytes and paths moved: paths that appeared in each node's store (NAR
#   sizes, queried on the node) and the outputs copied back;
# * peak memory (VmHWM at exit, tests/bench/peak-rss.c) of nsh-hook, each
#   nsh tool and the nix-store and ssh processes they start;
# * Slurm: the jobs the builds used (from the tickets), the controller's
#   RPCs during the mode (sdiag, reset before each mode: by nsh's Slurm
#   user, and by everyone, slurmd's job launches and completions included),
#   and, for the reuse modes, the jobs still in the queue once `linger` has
#   passed after the build (each mode has a pool of its own; a
#   rebuild shares its first build's, and so its knowledge of the node stores).
set -euo pipefail

HERE=$(cd "$(dirname "$0")/../.." && pwd)
ALL_MODES="local ssh ssh-rebuild nsh nsh-rebuild nsh-1job nsh-daemon nsh-daemon-rebuild nsh-daemon-1job"
MODES=${*:-$ALL_MODES}
DAG_WIDTH=${DAG_WIDTH:-9}
DAG_DEPTH=${DAG_DEPTH:-6}
BIG_MB=${BIG_MB:-30}
JOBS=${JOBS:-8}
BENCH_DIR=${BENCH_DIR:-/tmp/nsh-bench-dag/$(date -u +%Y%m%dT%H%M%S)}
NSH_BIN=${NSH_BIN:-$HERE/target/release}
PY=/usr/bin/python3

die() { echo "dag.sh: $*" >&2; exit 1; }
say() { echo "dag.sh: $*" >&2; }

[ "$(id -u)" = 0 ] || die "run it as root (it uses the test cluster's nix-daemon and node stores)"
if [ -z "${NSH_CONFIG:-}" ] || [ -z "${NSH_TEST_SSH_CONFIG:-}" ]; then
    env_file=${NSH_CLUSTER_DIR:-/tmp/nsh-cluster}/env
    [ -f "$env_file" ] || die "the test cluster is not up ($env_file is missing): tests/cluster/cluster up"
    # shellcheck disable=SC1090
    . "$env_file"
fi
missing=
command -v cc > /dev/null || missing="$missing gcc"
[ -x $PY ] || missing="$missing python3"
if [ -n "$missing" ]; then
    say "installing$missing"
    apt-get install -y -q $missing >/dev/null
fi
NODES=${NSH_TEST_NODES:-node1 node2}
BIG_NODE=${NSH_TEST_BIG_NODE:-node2}
SSH=(ssh -F "$NSH_TEST_SSH_CONFIG")
mkdir -p "$BENCH_DIR"
say "logs in $BENCH_DIR"

# --- the DAG ---------------------------------------------------------------
cat > "$BENCH_DIR/dag.nix" <<'EOF'
# DAG_DEPTH layers of DAG_WIDTH small derivations, each depending on three of
# the layer before (fan-in and fan-out); three large outputs, one of which
# needs the system feature `big`; a top that depends on all of the last
# layer and the large ones. `salt` makes every derivation new.
{ salt, width, depth, bigMb }:
let
  mod = a: b: a - (a / b) * b;
  mk = name: deps: script: extra: derivation ({
    name = "dag-${name}-${salt}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    inherit deps;
    args = [ "-c" "${script}; for d in $deps; do head -c 64 $d; done >> $out; echo ${name} >> $out" ];
  } // extra);
  small = i: j: mk "s${toString i}-${toString j}"
    (if i == 0 then [ ] else
      let prev = builtins.elemAt layers (i - 1);
      in map (k: builtins.elemAt prev (mod (j + k) width)) [ 0 1 3 ])
    ": > $out" { };
  layers = builtins.genList (i: builtins.genList (j: small i j) width) depth;
  random = mb: "head -c ${toString mb}M /dev/urandom > $out";
  bigA = mk "bigA" [ (builtins.elemAt (builtins.elemAt layers 0) 0) ] (random bigMb) { };
  bigB = mk "bigB" [ bigA ] (random bigMb) { requiredSystemFeatures = [ "big" ]; };
  bigC = mk "bigC" [ bigB (builtins.elemAt (builtins.elemAt layers (depth - 1)) 0) ] (random (bigMb * 2 / 3)) { };
in mk "top" (builtins.elemAt layers (depth - 1) ++ [ bigA bigB bigC ]) ": > $out" { }
EOF

# --- the nsh side: tools wrapped to record their peak memory ---------------
NSH_OK=
prepare_nsh() {
    local tools="nsh-hook nsh-closure nsh-alloc nsh-push nsh-run nsh-fetch" t
    if [ "$NSH_BIN" = "$HERE/target/release" ]; then
        local pkgs=()
        for t in $tools; do [ -d "$HERE/tools/$t" ] && pkgs+=(-p "$t"); done
        say "cargo build --release ${pkgs[*]}"
        (cd "$HERE" && cargo build --release -q "${pkgs[@]}") || return 1
    fi
    for t in $tools; do
        [ -x "$NSH_BIN/$t" ] || { say "$NSH_BIN/$t is missing: the nsh modes are skipped"; return 1; }
    done
    # Peak memory: every process of the hook's tree records its own VmHWM.
    cc -shared -fPIC -O2 -o "$BENCH_DIR/peak-rss.so" "$HERE/tests/bench/peak-rss.c" \
        || { say "cc failed: the nsh modes are skipped"; return 1; }
    NSH_OK=1
}

# The build hook as Nix (or the daemon, with its own environment) runs it:
# the ticket log and the peak-memory log go to the mode's directory.
write_hook() { # dir config runtime-dir
    cat > "$BENCH_DIR/nsh-hook" <<EOF
#!/bin/sh
export NSH_CONFIG=$2 NSH_RUNTIME_DIR=$3 NSH_TICKET_LOG=$1/tickets.jsonl NSH_LOG=${NSH_LOG:-warn}
export BENCH_RSS=$1/rss LD_PRELOAD=$BENCH_DIR/peak-rss.so
export PATH=/usr/local/bin:/usr/bin:/bin NIX_CONF_DIR=$NIX_CONF_DIR
exec $NSH_BIN/nsh-hook "\$@"
EOF
    chmod +x "$BENCH_DIR/nsh-hook"
}

# The cluster's configuration with one job per build (linger = 0), and the
# linger of the reuse modes.
write_configs() {
    grep -v '^linger *=' "$NSH_CONFIG" | sed 's/^\[cluster\.test\]$/&\nlinger = 0/' > "$BENCH_DIR/nsh-1job.toml"
    LINGER=${LINGER:-$(sed -n 's/^linger *= *\([0-9]*\).*/\1/p' "$NSH_CONFIG" | head -1)}
    LINGER=${LINGER:-60}
    grep -v '^linger *=' "$NSH_CONFIG" | sed "s/^\\[cluster\\.test\\]\$/&\\nlinger = $LINGER/" > "$BENCH_DIR/nsh-pool.toml"
}
config_for() { # mode
    case $1 in *-1job) echo "$BENCH_DIR/nsh-1job.toml" ;; *) echo "$BENCH_DIR/nsh-pool.toml" ;; esac
}

# --- Slurm: controller RPCs and jobs left -------------------------------------
SLURM_USER=$(sed -n 's/^user *= *"\(.*\)"/\1/p' "$NSH_CONFIG" | head -1)
rpcs_reset() { sdiag -r > /dev/null 2>&1 || say "sdiag -r failed: RPC counts include earlier calls"; }
rpcs_save() { # dir → "user all" RPC counts since the reset
    sdiag 2>/dev/null | sed -n '/by user/,/^$/p' | awk -v u="$SLURM_USER" '
        /count:/ { n = $0; sub(/.*count:/, "", n); sub(/ .*/, "", n); all += n; if ($1 == u) mine += n }
        END { print mine + 0, all + 0 }' > "$1/rpcs"
}
# The reuse modes: wait until every job the builds used has left the queue
# (each leaves by itself, `linger` after its last build); "left secs" in
# $dir/left: how many were still there after linger + 15 s, and how long the
# last took.
jobs_left_after_linger() { # dir
    local dir=$1 start jobs left=0 j
    jobs=$($PY -c '
import json, sys
print(" ".join(sorted({str(json.loads(l).get("alloc", {}).get("job", "")) for l in open(sys.argv[1]) if l.strip()} - {""})))
' "$dir/tickets.jsonl")
    start=$(date +%s)
    while :; do
        left=0
        for j in $jobs; do
            if squeue -h -j "$j" -o %T 2>/dev/null | grep -q .; then left=$((left + 1)); fi
        done
        [ "$left" -gt 0 ] && [ $(( $(date +%s) - start )) -lt $(( LINGER + 15 )) ] || break
        sleep 1
    done
    echo "$left $(( $(date +%s) - start ))" > "$dir/left"
    if [ "$left" -gt 0 ]; then
        say "$(basename "$dir"): $left jobs still in the queue $(( LINGER + 15 )) s after the build; cancelling them"
        for j in $jobs; do scancel "$j" 2>/dev/null || true; done
    fi
}

# --- the node stores ---------------------------------------------------------
node_paths() { # node → the store's valid-looking entries, sorted
    # (A fresh node's store is empty: grep then finds nothing, which is fine.)
    "${SSH[@]}" "$1" 'ls /nix/store' | { grep -v -e '^\.' -e '\.lock$' || true; } | sort
}
snapshot_nodes() { # dir tag
    local n
    for n in $NODES; do node_paths "$n" > "$1/$n.$2"; done
}
# This run's paths that appeared on each node since the snapshot: "node path
# narSize" lines. Only names with the run's salt count: other users of the
# test cluster may be adding paths to the node stores at the same time.
new_on_nodes() { # dir
    local n salt
    salt=$(cat "$1/salt")
    for n in $NODES; do
        node_paths "$n" > "$1/$n.after"
        comm -13 "$1/$n.before" "$1/$n.after" | grep -- "-$salt$" | sed 's|^|/nix/store/|' > "$1/$n.new" || true
        [ -s "$1/$n.new" ] || continue
        "${SSH[@]}" "$n" 'xargs nix-store --query --size' < "$1/$n.new" \
            | paste -d' ' "$1/$n.new" - | sed "s|^|$n |"
    done > "$1/node-new"
}

# --- one mode ----------------------------------------------------------------
SALT_BASE=$(date +%s)-$$
salt_for() { # mode → salt (a rebuild uses its first build's salt)
    echo "$SALT_BASE-${1%-rebuild}"
}

nix_build() { # dir, extra nix-build args…
    local dir=$1; shift
    local start end
    start=$(date +%s.%N)
    set +e
    nix-build "$BENCH_DIR/dag.nix" --no-out-link \
        --argstr salt "$(cat "$dir/salt")" --arg width "$DAG_WIDTH" --arg depth "$DAG_DEPTH" \
        --arg bigMb "$BIG_MB" --option substituters '' \
        --log-format internal-json -v "$@" 2>&1 > "$dir/result" \
        | $PY -u -c '
import sys, time
for line in sys.stdin:
    sys.stdout.write("%.6f %s" % (time.time(), line))
' > "$dir/nix.log"
    echo "${PIPESTATUS[0]}" > "$dir/status"
    set -e
    end=$(date +%s.%N)
    echo "$start $end" > "$dir/wall"
    if [ "$(cat "$dir/status")" != 0 ]; then
        say "$(basename "$dir"): nix-build failed (status $(cat "$dir/status")); last lines of $dir/nix.log:"
        grep -o '"msg":"[^"]*"' "$dir/nix.log" | tail -5 >&2 || true
    fi
}

# Every output of the DAG, from its .drv files.
dag_outputs() { # dir
    local drv
    drv=$(nix-instantiate "$BENCH_DIR/dag.nix" --argstr salt "$(cat "$1/salt")" \
        --arg width "$DAG_WIDTH" --arg depth "$DAG_DEPTH" --arg bigMb "$BIG_MB" 2>/dev/null)
    nix-store --query --requisites "$drv" | grep '\.drv$' \
        | xargs nix-store --query --outputs | grep -- "-dag-"
}

run_mode() { # mode
    local mode=$1 dir=$BENCH_DIR/$1
    mkdir -p "$dir"
    : > "$dir/rss"
    : > "$dir/tickets.jsonl"
    salt_for "$mode" > "$dir/salt"
    case $mode in
        *-rebuild)
            # Everything present on the nodes; the outputs gone locally.
            # (Only those that exist: the first build may have failed part-way.)
            dag_outputs "$dir" | while read -r p; do [ ! -e "$p" ] || echo "$p"; done > "$dir/outputs"
            if [ -s "$dir/outputs" ]; then
                xargs nix-store --delete < "$dir/outputs" > /dev/null 2>&1 \
                    || die "$mode: could not delete the outputs of the first build locally"
            fi
            ;;
    esac
    local remote=
    case $mode in local) ;; *) remote=1 ;; esac
    if [ -n "$remote" ]; then snapshot_nodes "$dir" before; rpcs_reset; fi
    say "$mode: building $(( DAG_WIDTH * DAG_DEPTH + 4 )) derivations"
    case $mode in
        local)
            nix_build "$dir" --max-jobs "$JOBS" --cores 1 --builders '' \
                --option system-features 'big big-parallel benchmark' ;;
        ssh|ssh-rebuild)
            local builders= n feats
            for n in $NODES; do
                feats=big-parallel,benchmark
                [ "$n" = "$BIG_NODE" ] && feats=$feats,big
                builders="$builders${builders:+; }ssh://$n x86_64-linux - $(( JOBS / 2 )) 1 $feats"
            done
            nix_build "$dir" --max-jobs 0 --builders "$builders" ;;
        nsh|nsh-rebuild|nsh-1job)
            write_hook "$dir" "$(config_for "$mode")" "$BENCH_DIR/${mode%-rebuild}/run"
            nix_build "$dir" --max-jobs 0 --builders '' --option build-hook "$BENCH_DIR/nsh-hook" ;;
        nsh-daemon|nsh-daemon-rebuild|nsh-daemon-1job)
            write_hook "$dir" "$(config_for "$mode")" "$BENCH_DIR/${mode%-rebuild}/run"
            nix_build "$dir" --store daemon --max-jobs 0 --builders '' \
                --option build-hook "$BENCH_DIR/nsh-hook" ;;
    esac
    if [ -n "$remote" ]; then rpcs_save "$dir"; fi
    case $mode in
        nsh*-1job) ;;
        nsh*) jobs_left_after_linger "$dir" ;;
    esac
    if [ -n "$remote" ]; then new_on_nodes "$dir"; fi
    dag_outputs "$dir" > "$dir/outputs"
    xargs nix-store --query --size < "$dir/outputs" | paste -d' ' "$dir/outputs" - > "$dir/output-sizes" \
        || say "$mode: some outputs are not valid locally"
    say "$mode: $(awk '{printf "%.1f s", $2 - $1}' "$dir/wall")"
}

for mode in $MODES; do
    case " $ALL_MODES " in *" $mode "*) ;; *) die "unknown mode $mode (known: $ALL_MODES)" ;; esac
done
case " $MODES " in
    *" nsh"*) prepare_nsh || true; write_configs ;;
esac
ran=
for mode in $MODES; do
    case $mode in
        nsh*) [ -n "$NSH_OK" ] || { say "$mode: skipped (no nsh tools)"; continue; } ;;
    esac
    case $mode in
        *-rebuild) [ -f "$BENCH_DIR/${mode%-rebuild}/result" ] || { say "$mode: run ${mode%-rebuild} first"; continue; } ;;
    esac
    run_mode "$mode"
    ran="$ran $mode"
done

# --- the tables --------------------------------------------------------------
{
    echo "Machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, Linux $(uname -r), $(nix --version), Slurm $(sinfo --version 2>/dev/null | cut -d' ' -f2)."
    echo "Date: $(date -u '+%Y-%m-%d %H:%M UTC'). DAG: $(( DAG_WIDTH * DAG_DEPTH )) small derivations (${DAG_DEPTH}×${DAG_WIDTH}), 3 large ($BIG_MB, $BIG_MB, $(( BIG_MB * 2 / 3 )) MiB; one needs \`big\`), 1 top; $JOBS builds at a time."
    echo
} > "$BENCH_DIR/report.md"
$PY - "$BENCH_DIR" $ran >> "$BENCH_DIR/report.md" <<'PY'
import json, os, statistics, subprocess, sys

bench, modes = sys.argv[1], sys.argv[2:]

def med(xs):
    return statistics.median(xs) if xs else float("nan")

def mean(xs):
    return statistics.fmean(xs) if xs else float("nan")

def fmt(x, digits=2):
    return "—" if x != x else f"{x:.{digits}f}"

def mib(n):
    return f"{n / 1048576:.1f}"

def connects(d):
    """Nix's ssh builder opens its connection before it accepts: the
    "connecting to 'ssh://…'" activities, in seconds."""
    starts, out = {}, []
    for line in open(os.path.join(d, "nix.log")):
        stamp, _, rest = line.partition(" ")
        if not rest.startswith("@nix "):
            continue
        try:
            ev = json.loads(rest[5:])
        except ValueError:
            continue
        if ev.get("action") == "start" and ev.get("text", "").startswith("connecting to 'ssh://"):
            starts[ev["id"]] = float(stamp)
        elif ev.get("action") == "stop" and ev["id"] in starts:
            out.append(float(stamp) - starts.pop(ev["id"]))
    return out

def builds(d):
    """Nix's own build activities: drv → (machine, start, stop)."""
    starts, out = {}, {}
    for line in open(os.path.join(d, "nix.log")):
        stamp, _, rest = line.partition(" ")
        if not rest.startswith("@nix "):
            continue
        try:
            ev = json.loads(rest[5:])
        except ValueError:
            continue
        if ev.get("action") == "start" and ev.get("type") == 105 and ev.get("text", "").startswith("building '"):
            fields = ev.get("fields", [])
            machine = fields[1] if len(fields) > 1 else "local"
            # nsh-hook's own progress activity names the node, not a machine URI.
            if "(Slurm job" in str(machine):
                continue
            starts[ev["id"]] = (fields[0] if fields else "?", machine, float(stamp))
        elif ev.get("action") == "stop" and ev["id"] in starts:
            drv, machine, t0 = starts.pop(ev["id"])
            out[drv] = (machine, t0, float(stamp))
    return out

RSS_ORDER = ["nsh-hook", "nsh-hook--watchdog", "nsh-closure", "nsh-alloc", "nsh-push", "nsh-run",
             "nsh-fetch", "nix-store", "ssh"]

def small(drv):
    return "-dag-s" in drv

rows, split_rows, rss_rows, moved_rows, connect_rows, slurm_rows = [], [], [], [], [], []
for mode in modes:
    d = os.path.join(bench, mode)
    t0, t1 = map(float, open(os.path.join(d, "wall")).read().split())
    status = open(os.path.join(d, "status")).read().strip()
    b = builds(d)
    durs = [s1 - s0 for drv, (_, s0, s1) in b.items() if small(drv)]
    big = [s1 - s0 for drv, (_, s0, s1) in b.items() if not small(drv)]
    machines = sorted({m or "local" for m, _, _ in b.values()})
    conn = connects(d)
    if conn:
        connect_rows.append(f"| {mode} | {len(conn)} | {fmt(med(conn), 3)} | {fmt(mean(conn), 3)} | {fmt(max(conn), 3)} |")
    rows.append(f"| {mode} | {'ok' if status == '0' else 'FAILED ' + status} | {t1 - t0:.1f} | {len(b)} | "
                f"{fmt(med(durs))} | {fmt(mean(durs))} | {fmt(max(durs) if durs else float('nan'))} | "
                f"{fmt(med(big))} | {', '.join(machines)} |")

    # Bytes and paths moved.
    new = [l.split() for l in open(os.path.join(d, "node-new"))] if os.path.exists(os.path.join(d, "node-new")) else []
    if mode != "local":
        outputs = {}
        if os.path.exists(os.path.join(d, "output-sizes")):
            for l in open(os.path.join(d, "output-sizes")):
                w = l.split()
                if len(w) == 2:
                    outputs[w[0]] = int(w[1])
        # Which node built what (nsh: from the tickets; Nix: from its log).
        built_on = set()
        tickets = [json.loads(l) for l in open(os.path.join(d, "tickets.jsonl")) if l.strip()]
        for t in tickets:
            node = t.get("alloc", {}).get("node")
            for p in t.get("drv", {}).get("outputs", {}).values():
                built_on.add((node, p))
        ssh_built = sorted(drv for drv, (m, _, _) in b.items() if m.startswith("ssh://"))
        if ssh_built:
            outs = subprocess.run(["nix-store", "--query", "--outputs", *ssh_built],
                                  capture_output=True, text=True, check=True).stdout.split()
            for drv, p in zip(ssh_built, outs):
                built_on.add((b[drv][0][len("ssh://"):], p))
        # What appeared on a node and was not built there was pushed to it.
        pushed = [(n, p, int(s)) for n, p, s in new if (n, p) not in built_on]
        made_there = [(n, p, int(s)) for n, p, s in new if (n, p) in built_on]
        tickets = [json.loads(l) for l in open(os.path.join(d, "tickets.jsonl")) if l.strip()]
        if tickets:
            pb = sum(t.get("push", {}).get("bytes", 0) for t in tickets)
            pc = sum(t.get("push", {}).get("copied", 0) for t in tickets)
            fb = sum(t.get("fetch", {}).get("bytes", 0) for t in tickets)
            fc = sum(len(t.get("fetch", {}).get("paths", [])) for t in tickets)
            ticket_cols = f"{pc} / {mib(pb)} | {fc} / {mib(fb)}"
        else:
            ticket_cols = "— | —"
        fetched = sum(outputs.values()) if b else 0
        moved_rows.append(
            f"| {mode} | {len(pushed)} / {mib(sum(s for _, _, s in pushed))} | "
            f"{len(made_there)} | {len(outputs)} / {mib(fetched)} | {ticket_cols} |")

    # nsh: the split from the tickets.
    tickets = [json.loads(l) for l in open(os.path.join(d, "tickets.jsonl")) if l.strip()]
    if tickets:
        parts = {k: [] for k in ["closure", "alloc", "queued", "push", "run", "fetch", "valid", "total", "excl"]}
        for t in tickets:
            h = t.get("hook", {})
            st = h.get("stages", {})
            if h.get("exit") != 0 or len(st) < 5:
                continue
            at = [st.get(s, 0) for s in ["nsh-closure", "nsh-alloc", "nsh-push", "nsh-run", "nsh-fetch"]]
            queued = t.get("alloc", {}).get("secs", {}).get("queued", 0.0)
            parts["closure"].append(at[0])
            parts["alloc"].append(at[1] - at[0])
            parts["queued"].append(queued)
            parts["push"].append(at[2] - at[1])
            parts["run"].append(at[3] - at[2])
            parts["fetch"].append(at[4] - at[3])
            parts["valid"].append(h["secs"] - at[4])
            parts["total"].append(h["secs"])
            parts["excl"].append(h["secs"] - queued)
        jobs = {(t.get("alloc", {}).get("node"), t.get("alloc", {}).get("job")) for t in tickets}
        nodes = sorted({n for n, _ in jobs if n})
        per_node = ", ".join(f"{n}: {sum(1 for m, _ in jobs if m == n)}" for n in nodes)
        cols = " | ".join(f"{fmt(med(parts[k]))} / {fmt(mean(parts[k]))}" for k in
                          ["total", "closure", "alloc", "queued", "push", "run", "fetch", "valid", "excl"])
        split_rows.append(f"| {mode} | {len(parts['total'])} | {cols} | {per_node} |")

    # Slurm: jobs used, controller RPCs, jobs left after linger.
    if os.path.exists(os.path.join(d, "rpcs")):
        mine, every = map(int, open(os.path.join(d, "rpcs")).read().split())
        nb = len(b) or 1
        used = {t.get("alloc", {}).get("job") for t in tickets} - {None}
        reused = sum(1 for t in tickets if t.get("alloc", {}).get("reused"))
        left = "—"
        if os.path.exists(os.path.join(d, "left")):
            n, secs = open(os.path.join(d, "left")).read().split()
            left = f"{n} (last left after {secs} s)"
        slurm_rows.append(f"| {mode} | {len(b)} | {len(used) if tickets else '—'} | "
                          f"{reused if tickets else '—'} | {mine} / {mine / nb:.1f} | "
                          f"{every} / {every / nb:.1f} | {left} |")

    # Peak memory (kB per process, at exit).
    rss = {}
    if os.path.exists(os.path.join(d, "rss")):
        for l in open(os.path.join(d, "rss")):
            w = l.split()
            if len(w) == 2 and w[1].isdigit():
                # nix-store --serve / --import / --check-validity: one column.
                name = "nix-store" if w[0].startswith("nix-store") else w[0]
                rss.setdefault(name, []).append(int(w[1]))
    if rss:
        rss_rows.append(f"| {mode} | " + " | ".join(
            f"{max(rss[t]) / 1024:.1f} / {med(rss[t]) / 1024:.1f} ({len(rss[t])})" if t in rss else "—"
            for t in RSS_ORDER) + " |")

print("Wall time, and per build Nix's own \"building '…' on '…'\" activity: hook accepts → outputs valid locally (seconds).\n")
print("| mode | result | wall (s) | builds | small: median | mean | max | large: median | machines |")
print("|---|---|---:|---:|---:|---:|---:|---:|---|")
print("\n".join(rows))
if connect_rows:
    print("\nNix's ssh builder connects (ssh handshake, `nix-store --serve` started on the node) *before* it "
          "accepts a build, so that time is not in the figures above; nsh connects after (in push or run).\n")
    print("| mode | connections | median (s) | mean (s) | max (s) |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(connect_rows))
if moved_rows:
    print("\nPaths / MiB moved. *Pushed*: paths that appeared in the node stores and are not outputs of this DAG "
          "(NAR sizes queried on the nodes); *built there*: outputs that appeared on a node; *fetched*: "
          "the DAG's outputs (local NAR sizes). Last two columns: the sums of the nsh tickets' "
          "`push.copied`/`push.bytes` and `fetch.paths`/`fetch.bytes`.\n")
    print("| mode | pushed (paths / MiB) | built there (paths) | fetched (paths / MiB) | tickets: pushed | tickets: fetched |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(moved_rows))
if split_rows:
    print("\nnsh, per build, from the final tickets and the hook's clock (median / mean, seconds): "
          "*total* accept → outputs valid; *closure*; *alloc* (nsh-alloc: submit → RUNNING); "
          "*queued* (of which Slurm's own queue, `alloc.secs.queued`); *push*; *run* (request → "
          "result, the build included); *fetch*; *valid* (fetch's ticket → the hook's validity check "
          "done); *excl. queue* = total − queued.\n")
    print("| mode | builds | total | closure | alloc | queued | push | run | fetch | valid | excl. queue | jobs per node |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(split_rows))
if slurm_rows:
    print("\nSlurm: the jobs the builds used and how many builds took a pooled job (from the tickets); "
          "the controller's RPCs during the mode (`sdiag`, reset before it), in all / per build, "
          "by nsh's Slurm user (nsh's own REST or CLI calls) and by everyone (slurmd's job "
          "launches and completions too); for the reuse modes, the jobs still queued once "
          "`linger` + 15 s had passed after the build.\n")
    print("| mode | builds | Slurm jobs | reused | RPCs, nsh's user (all / per build) | RPCs, everyone | jobs left after linger |")
    print("|---|---:|---:|---:|---:|---:|---|")
    print("\n".join(slurm_rows))
if rss_rows:
    print("\nPeak memory: each process's own VmHWM at exit, MiB, max / median (number of processes). "
          "`nix-store` and `ssh` are the processes the tools start.\n")
    print("| mode | " + " | ".join(RSS_ORDER) + " |")
    print("|---|" + "---:|" * len(RSS_ORDER))
    print("\n".join(rss_rows))
PY
cat "$BENCH_DIR/report.md"
