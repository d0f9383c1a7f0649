#!/usr/bin/env bash
# Data-plane benchmark: TCP throughput (iperf3, 1 and 4 streams, both
# directions) and ping RTT between two network namespaces joined by a veth,
# through: our engine (`sidecar wg`, built as `ist-wg`), wireguard-go
# (Debian), gotatun (Mullvad's Rust WireGuard, `cargo install gotatun-cli`),
# and the raw veth without a tunnel. Every implementation is started the same
# way, as `IMPL <ifname>` (it daemonizes), and configured with `wg set`.
#
# Needs root, iperf3, wg, wireguard-go. Creates and removes its own
# namespaces; underlay 198.51.100.0/24, overlay 10.240.0.0/22 inside them only.
#
#   benches/dataplane.sh            # DURATION=5 seconds per iperf3 run
#   DURATION=10 benches/dataplane.sh
#   WORKERS=3 benches/dataplane.sh  # crypto workers of the "ours+workers" row (2)
#   ROWS="ours ours+workers" benches/dataplane.sh   # only some rows
#   OURS_BIN=/tmp/ist-wg-old ROWS=ours benches/dataplane.sh  # another build of ours
#
# Ends with: dataplane: <ours> Mbit/s (<c> CPU-s/GB), <x.xx>x wireguard-go, <y.yy>x gotatun
# (single-stream TCP, A -> B; CPU: both tunnel processes). A benchmark, not a test: it never fails on speed.
set -euo pipefail

DURATION=${DURATION:-5}
WORKERS=${WORKERS:-2}
ROWS=${ROWS:-"ours ours+workers wireguard-go gotatun veth"}
row() { case " $ROWS " in *" $1 "*) return 0 ;; esac; return 1; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TAG=$$
NS_A=dpbench${TAG}a
NS_B=dpbench${TAG}b
IF_A=wbench${TAG}a
IF_B=wbench${TAG}b
WORK=$(mktemp -d)

cleanup() {
    for ns in "$NS_A" "$NS_B"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
    done
    sleep 0.5
    for ns in "$NS_A" "$NS_B"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -f "/var/run/wireguard/$IF_A.sock" "/var/run/wireguard/$IF_B.sock"
    rm -rf "$WORK"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "dataplane.sh: needs root" >&2; exit 1; }
for tool in iperf3 wg wireguard-go ping; do
    command -v "$tool" >/dev/null || { echo "dataplane.sh: needs $tool" >&2; exit 1; }
done

if [ -n "${OURS_BIN:-}" ]; then
    OURS=$OURS_BIN # another build of ours, to compare two (nothing is built)
else
    echo "building ours (release)..." >&2
    (cd "$ROOT" && cargo build --release -q -p ist-mesh --bin ist-wg)
    OURS=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release/ist-wg
    [ -x "$OURS" ] || OURS="$ROOT/target/release/ist-wg"
fi

GOTATUN=$(command -v gotatun || true)
GOTATUN_NOTE=""
if [ -z "$GOTATUN" ] && [ -x "$HOME/.cargo/bin/gotatun" ]; then GOTATUN="$HOME/.cargo/bin/gotatun"; fi
if [ -z "$GOTATUN" ] && row gotatun; then
    echo "installing gotatun-cli..." >&2
    if cargo install -q gotatun-cli >&2; then
        GOTATUN="$HOME/.cargo/bin/gotatun"
    else
        GOTATUN_NOTE="gotatun skipped: cargo install gotatun-cli failed"
    fi
fi

# Two namespaces and a veth between them (MTU 1500).
ip netns add "$NS_A"
ip netns add "$NS_B"
ip link add "vb${TAG}a" netns "$NS_A" type veth peer name "vb${TAG}b" netns "$NS_B"
ip -n "$NS_A" addr add 198.51.100.1/24 dev "vb${TAG}a"
ip -n "$NS_B" addr add 198.51.100.2/24 dev "vb${TAG}b"
for ns in "$NS_A" "$NS_B"; do
    ip -n "$ns" link set lo up
done
ip -n "$NS_A" link set "vb${TAG}a" up
ip -n "$NS_B" link set "vb${TAG}b" up

umask 077
wg genkey >"$WORK/ka"
wg genkey >"$WORK/kb"
PUB_A=$(wg pubkey <"$WORK/ka")
PUB_B=$(wg pubkey <"$WORK/kb")

# iperf3 client run: $1 namespace, $2 server address, rest: extra flags.
# Prints the receiver-side Mbit/s.
iperf() {
    local ns=$1 addr=$2
    shift 2
    ip netns exec "$ns" iperf3 -c "$addr" -t "$DURATION" -f m "$@" 2>/dev/null |
        awk '/receiver/ { v = $(NF-2) } END { if (v == "") v = 0; print v }'
}

# Average ping RTT in ms over 50 pings 20 ms apart: $1 namespace, $2 address.
rtt() {
    ip netns exec "$1" ping -c 50 -i 0.02 -W 2 "$2" 2>/dev/null |
        awk -F'/' '/^rtt/ { print $5 } END {}' | head -1
}

# Ping RTT after load: 200 pings 20 ms apart: "avg max over1ms" (ms, ms,
# count of pings over 1 ms). $1 namespace, $2 address.
rtt_after() {
    ip netns exec "$1" ping -c 200 -i 0.02 -W 2 "$2" 2>/dev/null |
        awk -F'time=' '/time=/ { split($2, t, " "); v = t[1] + 0; n++; s += v;
            if (v > m) m = v; if (v > 1) o++ }
            END { if (n) printf "%.3f %.2f %d", s / n, m, o; else print "? ? ?" }'
}

declare -A RESULT

# CPU ticks (user + system) of every process in both namespaces but iperf3:
# the tunnel implementation's two processes.
tunnel_ticks() {
    local t=0 pid
    for ns in "$NS_A" "$NS_B"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = iperf3 ] && continue
            t=$((t + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
        done
    done
    echo "$t"
}

# Measures between A and B at $2 (address of B): label $1.
measure() {
    local label=$1 b_addr=$2 a_addr=$3
    ip netns exec "$NS_B" iperf3 -s -D -p 5201 >/dev/null 2>&1
    ip netns exec "$NS_A" iperf3 -s -D -p 5201 >/dev/null 2>&1
    sleep 0.3
    ip netns exec "$NS_A" ping -c 3 -i 0.2 -W 2 "$b_addr" >/dev/null 2>&1 || true
    # Idle RTT first (after the warm-up ping), the same for every impl.
    RESULT[$label,rtt]=$(rtt "$NS_A" "$b_addr")
    local t0 t1
    t0=$(tunnel_ticks)
    RESULT[$label,1up]=$(iperf "$NS_A" "$b_addr")
    t1=$(tunnel_ticks)
    # CPU seconds of the tunnel processes per GB (10^9 bytes) received.
    RESULT[$label,cpu]=$(awk -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v m="${RESULT[$label,1up]}" \
        -v d="$DURATION" 'BEGIN { gb = m * d / 8000; if (gb > 0 && t > 0) printf "%.2f", t / hz / gb; else print "-" }')
    RESULT[$label,1down]=$(iperf "$NS_B" "$a_addr")
    RESULT[$label,4up]=$(iperf "$NS_A" "$b_addr" -P 4)
    RESULT[$label,4down]=$(iperf "$NS_B" "$a_addr" -P 4)
    # Then RTT right after the load (average, worst, pings over 1 ms).
    RESULT[$label,after]=$(rtt_after "$NS_A" "$b_addr")
    pkill_ns_iperf
}

pkill_ns_iperf() {
    for ns in "$NS_A" "$NS_B"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            if [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = iperf3 ]; then kill "$pid" 2>/dev/null || true; fi
        done
    done
    sleep 0.3
}

# Starts implementation $2 (label $1) on both sides, configured with wg set,
# measures, and tears it down. $3: our crypto workers (0: none).
tunnel() {
    local label=$1 impl=$2 workers=${3:-0}
    echo "measuring $label..." >&2
    # WG_LOG_FILE / WG_SUDO: gotatun's log file, and keeping root (its
    # privilege drop fails without a login session); ignored by the others.
    WG_LOG_FILE=/dev/null WG_SUDO=1 IST_WG_CRYPTO_WORKERS=$workers \
        ip netns exec "$NS_A" "$impl" "$IF_A" >/dev/null 2>&1
    WG_LOG_FILE=/dev/null WG_SUDO=1 IST_WG_CRYPTO_WORKERS=$workers \
        ip netns exec "$NS_B" "$impl" "$IF_B" >/dev/null 2>&1
    for i in $(seq 1 100); do
        [ -S "/var/run/wireguard/$IF_A.sock" ] && [ -S "/var/run/wireguard/$IF_B.sock" ] && break
        sleep 0.05
    done
    ip netns exec "$NS_A" wg set "$IF_A" private-key "$WORK/ka" listen-port 51820 \
        peer "$PUB_B" allowed-ips 10.240.0.2/32 endpoint 198.51.100.2:51820
    ip netns exec "$NS_B" wg set "$IF_B" private-key "$WORK/kb" listen-port 51820 \
        peer "$PUB_A" allowed-ips 10.240.0.1/32 endpoint 198.51.100.1:51820
    ip -n "$NS_A" addr add 10.240.0.1/22 dev "$IF_A"
    ip -n "$NS_B" addr add 10.240.0.2/22 dev "$IF_B"
    ip -n "$NS_A" link set "$IF_A" mtu 1420 up
    ip -n "$NS_B" link set "$IF_B" mtu 1420 up
    measure "$label" 10.240.0.2 10.240.0.1
    ip -n "$NS_A" link del "$IF_A" 2>/dev/null || true
    ip -n "$NS_B" link del "$IF_B" 2>/dev/null || true
    for ns in "$NS_A" "$NS_B"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
    done
    for i in $(seq 1 60); do
        [ -z "$(ip netns pids "$NS_A")$(ip netns pids "$NS_B")" ] && break
        sleep 0.05
    done
    rm -f "/var/run/wireguard/$IF_A.sock" "/var/run/wireguard/$IF_B.sock"
}

LABELS=()
if row ours; then LABELS+=(ours); tunnel ours "$OURS"; fi
if row ours+workers; then LABELS+=(ours+workers); tunnel ours+workers "$OURS" "$WORKERS"; fi
if row wireguard-go; then LABELS+=(wireguard-go); tunnel wireguard-go wireguard-go; fi
if row gotatun && [ -n "$GOTATUN" ]; then
    LABELS+=(gotatun)
    tunnel gotatun "$GOTATUN"
fi
if row veth; then
    echo "measuring raw veth..." >&2
    measure veth 198.51.100.2 198.51.100.1
    LABELS+=(veth)
fi

echo
echo "iperf3 TCP receiver Mbit/s (${DURATION}s each), ping RTT ms; A->B = up, B->A = down;"
echo "CPU-s/GB: user+system seconds of both tunnel processes per 10^9 bytes in the 1-up run"
printf '%-14s %10s %10s %10s %10s %9s %9s  %s\n' impl "1 up" "1 down" "4 up" "4 down" "CPU-s/GB" "rtt ms" \
    "after load: avg ms, worst ms, pings over 1 ms (of 200)"
for l in "${LABELS[@]}"; do
    printf '%-14s %10s %10s %10s %10s %9s %9s  %s\n' "$l" "${RESULT[$l,1up]}" "${RESULT[$l,1down]}" \
        "${RESULT[$l,4up]}" "${RESULT[$l,4down]}" "${RESULT[$l,cpu]:--}" "${RESULT[$l,rtt]:-?}" "${RESULT[$l,after]:-?}"
done
[ -n "$GOTATUN_NOTE" ] && echo "$GOTATUN_NOTE"

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
OURS_1=${RESULT[ours,1up]:-0}
if row ours+workers; then
    echo "crypto workers ($WORKERS): 1 stream $(ratio "${RESULT[ours+workers,1up]}" "$OURS_1")x up, $(ratio "${RESULT[ours+workers,1down]}" "${RESULT[ours,1down]:-0}")x down; 4 streams $(ratio "${RESULT[ours+workers,4up]}" "${RESULT[ours,4up]:-0}")x up, $(ratio "${RESULT[ours+workers,4down]}" "${RESULT[ours,4down]:-0}")x down (against ours without)"
fi
LINE="dataplane: $OURS_1 Mbit/s (${RESULT[ours,cpu]:--} CPU-s/GB), $(ratio "$OURS_1" "${RESULT[wireguard-go,1up]:-0}")x wireguard-go"
if [ -n "${RESULT[gotatun,1up]:-}" ]; then
    LINE="$LINE, $(ratio "$OURS_1" "${RESULT[gotatun,1up]}")x gotatun"
else
    LINE="$LINE, n/a gotatun (skipped)"
fi
echo "$LINE"
