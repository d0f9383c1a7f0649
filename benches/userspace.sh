#!/usr/bin/env bash
# Userspace-mode benchmark: throughput of one TCP stream (iperf3) through
# userspace mode on loopback, against onetun (`cargo install onetun`) in the
# same run. No root needed; every packet stays on 127.0.0.1.
#
#   ours:   iperf3 -> 127.0.0.1 (member A's loopback relay) -> A's smoltcp
#           stack -> WireGuard -> member B's stack -> 127.0.0.1 iperf3 -s
#   onetun: iperf3 -> onetun (its own smoltcp + WireGuard, as 10.240.0.3)
#           -> the same member B -> the same iperf3 -s
#
# Both paths share member B, so the ratio compares the client sides (A versus
# onetun), both in release builds. onetun's figure is not an artefact of
# member B: against wireguard-go and the kernel's TCP (in namespaces, same
# machine) onetun 0.3.10 measured the same ~6 Mbit/s, its log full of
# "Failed to read event bus" (its per-packet channel bridge overflowing).
#
#   benches/userspace.sh              # DURATION=5 seconds per iperf3 run
#   DURATION=10 benches/userspace.sh
#
# Ends with: userspace: <ours> Mbit/s, <x.xx>x onetun
# A benchmark, not a test: it never fails on speed.
set -euo pipefail

DURATION=${DURATION:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

for tool in iperf3 wg; do
    command -v "$tool" >/dev/null || { echo "userspace.sh: needs $tool" >&2; exit 1; }
done

echo "building ours (release)..." >&2
(cd "$ROOT" && cargo build --release -q --example userspace_pair)
TARGET=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
PAIR="${TARGET:-$ROOT/target}/release/examples/userspace_pair"

ONETUN=${ONETUN:-$(command -v onetun || true)}
if [ -z "$ONETUN" ] && [ -x "$HOME/.cargo/bin/onetun" ]; then ONETUN="$HOME/.cargo/bin/onetun"; fi
if [ -z "$ONETUN" ]; then
    echo "installing onetun..." >&2
    cargo install -q --locked onetun >&2
    ONETUN="$HOME/.cargo/bin/onetun"
fi

# Free loopback ports (bind-and-release through the kernel).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
IPERF_PORT=$(free_port)
OT_PORT=$(free_port)

iperf3 -s -p "$IPERF_PORT" >/dev/null 2>&1 &
PIDS+=($!)

# onetun's key pair, generated here where it is used.
OT_PRIV=$(wg genkey)
OT_PUB=$(echo "$OT_PRIV" | wg pubkey)

mkfifo "$WORK/stdin"
"$PAIR" "$IPERF_PORT" "$OT_PUB" <"$WORK/stdin" >"$WORK/pair.out" 2>"$WORK/pair.err" &
PIDS+=($!)
exec 3>"$WORK/stdin"   # keeps the pair running until we exit

for _ in $(seq 100); do
    grep -q '^listen=' "$WORK/pair.out" 2>/dev/null && break
    sleep 0.1
done
LINE=$(head -1 "$WORK/pair.out")
[ -n "$LINE" ] || { echo "userspace_pair did not start:" >&2; cat "$WORK/pair.err" >&2; exit 1; }
field() { echo "$LINE" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
OURS_ADDR=$(field listen)
B_EP=$(field b_endpoint)
B_PUB=$(field b_public)

"$ONETUN" "127.0.0.1:$OT_PORT:10.240.0.2:$IPERF_PORT" \
    --endpoint-addr "$B_EP" --endpoint-public-key "$B_PUB" \
    --private-key "$OT_PRIV" --source-peer-ip 10.240.0.3 \
    --keep-alive 10 --log warn >"$WORK/onetun.log" 2>&1 &
PIDS+=($!)
sleep 1

# Receiver-side Mbit/s of one iperf3 stream to 127.0.0.1:<port>.
measure() {
    iperf3 -c 127.0.0.1 -p "$1" -t "$DURATION" -f m 2>&1 |
        awk '/receiver/ { for (i = 1; i <= NF; i++) if ($i == "Mbits/sec") print $(i - 1) }'
}

OURS=$(measure "${OURS_ADDR##*:}")
THEIRS=$(measure "$OT_PORT")
echo "ours (meshlib userspace): ${OURS:-0} Mbit/s" >&2
echo "onetun $("$ONETUN" --version 2>/dev/null | awk '{print $2}'): ${THEIRS:-0} Mbit/s" >&2
RATIO=$(awk -v a="${OURS:-0}" -v b="${THEIRS:-0}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "inf" }')
echo "userspace: ${OURS:-0} Mbit/s, ${RATIO}x onetun"
