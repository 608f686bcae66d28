#!/usr/bin/env bash
# A three-node Tributary cluster on this machine: a throwaway PostgreSQL and a throwaway Garage
# (S3-compatible) server, three coordinator nodes sharing them (one leads, two stand by and take
# over when it dies), and trainers that know all three addresses. Prints where to look, runs the
# experiment to the end, and checks the ledger with `verify`.
#
#   deploy/cluster.sh [--synthetic] [--trainers N] [--experiment FILE] [--out DIR] [--kill-leader SECONDS]
#                     [--leader-uploads]
#
# --synthetic: synthetic trainers (tributary-loadgen, experiments/synthetic.toml, 20 trainers):
#   seconds, no model. Otherwise real `tributary-trainer join` processes on the quickstart's
#   SmolLM2 experiment (CPU-only trainer unless TRIBUTARY_GPU=1).
# --kill-leader S: SIGKILL the leading node S seconds in, to watch another one take over.
# --leader-uploads: synthetic trainers send every delta to the leader, as before uploads were
#   spread over the nodes (for comparison; real trainers always spread them).
# Needs PostgreSQL (initdb) and Garage (`cargo install garage --locked`); `.ci/run` shows how.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/run/cluster-$(date +%Y%m%d-%H%M%S)"
synthetic=0
trainers=
experiment=
kill_leader=
spread=(--spread-uploads)
while [ $# -gt 0 ]; do
    case "$1" in
        --synthetic) synthetic=1; shift ;;
        --trainers) trainers="$2"; shift 2 ;;
        --experiment) experiment=$(realpath "$2"); shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --kill-leader) kill_leader="$2"; shift 2 ;;
        --leader-uploads) spread=(); shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
if [ "$synthetic" = 1 ]; then
    experiment=${experiment:-$root/experiments/synthetic.toml}
    trainers=${trainers:-20}
else
    experiment=${experiment:-$root/experiments/quickstart.toml}
    trainers=${trainers:-3}
    "$root/deploy/fetch-assets.sh"
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)

echo "building (release)..."
(cd "$root" && cargo build --release --locked -q -p tributary-coordinator -p tributary-tests \
    --bin tributary-coordinator --bin tributary-test-stores --bin tributary-loadgen)
if [ "$synthetic" = 0 ]; then
    features=(--no-default-features)
    [ "${TRIBUTARY_GPU:-0}" = 1 ] && features=()
    (cd "$root" && cargo build --release --locked -q -p tributary-trainer ${features[@]+"${features[@]}"})
fi
bin="$root/target/release"

pids=()
cleanup() {
    for name in a b c; do touch "$out/$name.stop" 2>/dev/null || true; done
    pkill -f -- "--data-dir $out/" 2>/dev/null || true
    kill "${pids[@]}" 2>/dev/null || true
}
trap cleanup EXIT

# PostgreSQL and Garage: both die with this script.
"$bin/tributary-test-stores" >"$out/stores.env" 2>"$out/stores.log" &
pids+=($!)
for _ in $(seq 1 600); do
    grep -q STORES_READY "$out/stores.env" 2>/dev/null && break
    kill -0 "${pids[0]}" 2>/dev/null || { cat "$out/stores.log" >&2; exit 1; }
    sleep 0.1
done
# shellcheck disable=SC1091
. "$out/stores.env"
echo "PostgreSQL: ${DATABASE%%\?*}"
echo "S3 (Garage): $AWS_ENDPOINT, $BLOBS"

free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
free_tcp_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# One node: serve in a loop, as a supervisor would (a node that loses the lease exits with 75
# and comes back as a standby node).
# Every node serves HTTP on its own fixed port: the hub pages while it stands by, everything
# once it leads.
node() {
    local name=$1 port=$2 http=$3
    while true; do
        "$bin/tributary-coordinator" serve --data-dir "$out/$name" --listen "127.0.0.1:$port" \
            --database "$DATABASE" --blobs "$BLOBS" --experiment "$experiment" \
            --http "127.0.0.1:$http" --ready-file "$out/$name.ready" --lease-seconds 2 \
            >>"$out/$name.out" 2>>"$out/$name.log" && break
        status=$?
        [ -f "$out/$name.stop" ] && break
        echo "node $name exited ($status); restarting it" >>"$out/$name.log"
        sleep 1
    done
}

ports=($(free_port) $(free_port) $(free_port))
http_ports=($(free_tcp_port) $(free_tcp_port) $(free_tcp_port))
node a "${ports[0]}" "${http_ports[0]}" &
pids+=($!)
for _ in $(seq 1 600); do [ -s "$out/a.ready" ] && break; sleep 0.1; done
[ -s "$out/a.ready" ] || { cat "$out/a.log" >&2; exit 1; }
field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
fingerprint=$(field "$out/a.ready" fingerprint)
# Every node carries the cluster's identity: the certificate trainers pin, the ledger key that
# signs every entry, the operator key.
for name in b c; do
    mkdir -p "$out/$name/tls"
    cp "$out/a/tls/cert.pem" "$out/a/tls/key.pem" "$out/$name/tls/"
    cp "$out/a/ledger.key" "$out/a/operator.key" "$out/$name/"
done
node b "${ports[1]}" "${http_ports[1]}" &
pids+=($!)
node c "${ports[2]}" "${http_ports[2]}" &
pids+=($!)
addrs="127.0.0.1:${ports[0]},127.0.0.1:${ports[1]},127.0.0.1:${ports[2]}"
echo "nodes: a (leader) 127.0.0.1:${ports[0]}, b 127.0.0.1:${ports[1]}, c 127.0.0.1:${ports[2]}"
echo "certificate fingerprint: $fingerprint"
https="127.0.0.1:${http_ports[0]},127.0.0.1:${http_ports[1]},127.0.0.1:${http_ports[2]}"
echo "logs: $out/{a,b,c}.log; status and hub of each node: http://127.0.0.1:${http_ports[0]}/status (a), :${http_ports[1]} (b), :${http_ports[2]} (c)"
echo "pause the fleet: $bin/tributary-coordinator pause --http $https --data-dir $out/a"

if [ "$synthetic" = 1 ]; then
    "$bin/tributary-loadgen" --coordinator "$addrs" --fingerprint "$fingerprint" \
        --trainers "$trainers" ${spread[@]+"${spread[@]}"} >"$out/trainers.out" \
        2>"$out/trainers.log" &
    trainer_pids=($!)
else
    threads=$(( $(nproc) / trainers )); [ "$threads" -ge 1 ] || threads=1
    trainer_pids=()
    for i in $(seq 1 "$trainers"); do
        RAYON_NUM_THREADS=$threads "$bin/tributary-trainer" join "$addrs" \
            --fingerprint "$fingerprint" --identity "$out/trainer-$i.key" \
            >"$out/trainer-$i.json" 2>"$out/trainer-$i.log" &
        trainer_pids+=($!)
    done
fi
pids+=("${trainer_pids[@]}")
echo "$trainers trainers joining"

if [ -n "$kill_leader" ]; then
    sleep "$kill_leader"
    leader=$(pgrep -f -- "--data-dir $out/a " | head -1 || true)
    if [ -n "$leader" ]; then
        touch "$out/a.stop"
        kill -9 "$leader"
        echo "killed the leader (node a) after $kill_leader s; b or c takes over (see their logs)"
    else
        echo "node a had already stopped; nothing to kill"
    fi
fi
for pid in "${trainer_pids[@]}"; do wait "$pid" || true; done
echo "trainers done"
# CPU seconds each node's process has used (user + system), for the per-node cost of a run.
ticks=$(getconf CLK_TCK)
for name in a b c; do
    pid=$(pgrep -f -- "--data-dir $out/$name " | head -1 || true)
    if [ -n "$pid" ] && [ -r "/proc/$pid/stat" ]; then
        awk -v t="$ticks" -v n="$name" '{ printf "cpu %s %.1f s\n", n, ($14 + $15) / t }' \
            "/proc/$pid/stat" | tee -a "$out/cpu.txt"
    fi
done
# Any node's data directory points at the shared database and bucket.
"$bin/tributary-coordinator" verify --data-dir "$out/b"
"$bin/tributary-coordinator" status --data-dir "$out/b" >"$out/status.json"
grep -h "took the leader lease\|lease lapses" "$out"/{b,c}.log | cut -c1-200 | sed 's/^/  /' || true
echo "run folder: $out"
