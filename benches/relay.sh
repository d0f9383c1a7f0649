#!/usr/bin/env bash
# Relay benchmark: one TCP stream (iperf3) and ping RTT between two members
# over the direct path, then over the relay, in the same run, and the
# relay's CPU time per GB forwarded. Real programs (release builds): a
# keyserver, `keyserver relay` as its own process (so its CPU is its own),
# and two kernel-mode sidecars, each in a namespace on one bridged
# underlay. The direct path is then cut (nftables in A's namespace drops
# everything to and from B), so both sidecars fall back to the relay.
#
# Needs root, iperf3, nft, curl, python3. Creates and removes its own
# namespaces; underlay 192.0.2.0/24, overlay 10.240.0.0/22 inside them only.
#
#   sudo benches/relay.sh              # DURATION=5 seconds per iperf3 run
#   DURATION=10 sudo benches/relay.sh
#   RELAY_METRICS=1 sudo benches/relay.sh   # also print the relay's counters
#   KEEP_WORK=1 sudo benches/relay.sh       # keep the logs' directory
#
# Ends with: relay: <r> Mbit/s (<x.xx>x direct's <d> Mbit/s), rtt <a> ms
# (direct <b> ms), <c> CPU-s per GB forwarded. A benchmark: never fails on
# speed.
set -euo pipefail

DURATION=${DURATION:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TAG=$$
HUB=rlb${TAG}h
KS=rlb${TAG}k
RL=rlb${TAG}r
NA=rlb${TAG}a
NB=rlb${TAG}b
WORK=$(mktemp -d)
KEEP=${KEEP_WORK:-}
ALL="$HUB $KS $RL $NA $NB"

cleanup() {
    for ns in $ALL; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
    done
    sleep 0.5
    for ns in $ALL; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -f "/var/run/wireguard/rlb${TAG}a.sock" "/var/run/wireguard/rlb${TAG}b.sock"
    [ -n "$KEEP" ] || rm -rf "$WORK"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "relay.sh: needs root" >&2; exit 1; }
for tool in iperf3 nft curl python3 ping; do
    command -v "$tool" >/dev/null || { echo "relay.sh: needs $tool" >&2; exit 1; }
done

echo "building keyserver and sidecar (release)..." >&2
(cd "$ROOT" && cargo build --release -q -p keyserver -p sidecar)
TARGET=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$TARGET" ] || TARGET="$ROOT/target"
KEYSERVER=$TARGET/release/keyserver
SIDECAR=$TARGET/release/sidecar

# The underlay: a bridge in the hub, one veth per namespace.
ip netns add "$HUB"
ip -n "$HUB" link add br0 type bridge
ip -n "$HUB" link set br0 up
n=0
for pair in "$KS 192.0.2.2" "$RL 192.0.2.3" "$NA 192.0.2.10" "$NB 192.0.2.11"; do
    set -- $pair
    n=$((n + 1))
    ip netns add "$1"
    ip link add "rv${TAG}$n" netns "$1" type veth peer name "rh${TAG}$n" netns "$HUB"
    ip -n "$HUB" link set "rh${TAG}$n" master br0 up
    ip -n "$1" addr add "$2/24" dev "rv${TAG}$n"
    ip -n "$1" link set "rv${TAG}$n" up
    ip -n "$1" link set lo up
done

# Keyserver (no relay of its own), then the relay with a copy of its secret.
ip netns exec "$KS" "$KEYSERVER" serve --data-dir "$WORK/ks" --quic-listen 192.0.2.2:7000 \
    --api-listen 127.0.0.1:7001 --relay-listen off --relay-advertise 192.0.2.3:3478 \
    --tcp-listen off 2>"$WORK/ks.log" >/dev/null &
for _ in $(seq 100); do [ -f "$WORK/ks/api.url" ] && break; sleep 0.1; done
ks() { ip netns exec "$KS" "$KEYSERVER" --data-dir "$WORK/ks" "$@"; }
for _ in $(seq 100); do ks network list >/dev/null 2>&1 && break; sleep 0.1; done
cp "$WORK/ks/relay-secret" "$WORK/relay-secret"
ip netns exec "$RL" "$KEYSERVER" relay --listen 192.0.2.3:3478 --secret-file "$WORK/relay-secret" \
    --metrics 127.0.0.1:9478 --rate 100000000000 --burst 100000000 2>"$WORK/relay.log" >/dev/null &
RELAY_PID=$!
ks network create bench >/dev/null
TOKEN=$(ks token create --network bench --uses 2 | grep -o 'istm1\.[A-Za-z0-9_-]*')

for side in a b; do
    ns=rlb${TAG}$side
    ip netns exec "$ns" "$SIDECAR" up --token "$TOKEN" --service "$side" --interface "rlb${TAG}$side" \
        --state-dir "$WORK/state-$side" --metrics off --no-dns --hosts-file "" \
        2>"$WORK/sidecar-$side.log" >/dev/null &
done

status() { "$SIDECAR" status --json --state-dir "$WORK/state-$1" 2>/dev/null || true; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)" 2>/dev/null || true; }
for _ in $(seq 200); do
    IP_B=$(status b | field 'd["ip"]')
    [ -n "$IP_B" ] && [ "$(status a | field 'd["peers"][0]["path"]["kind"]')" = direct ] && break
    sleep 0.1
done
[ -n "${IP_B:-}" ] || { echo "relay.sh: members did not come up" >&2; cat "$WORK"/*.log >&2; exit 1; }

ip netns exec "$NB" iperf3 -s -D -B "$IP_B" >/dev/null
sleep 0.5
measure() { # $1: label
    local bps rtt
    bps=$(ip netns exec "$NA" iperf3 -c "$IP_B" -t "$DURATION" -J |
        field 'round(d["end"]["sum_received"]["bits_per_second"] / 1e6)')
    rtt=$(ip netns exec "$NA" ping -c 20 -i 0.05 -q "$IP_B" | sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p')
    echo "$1: $bps Mbit/s, rtt $rtt ms ($(status a | field 'd["peers"][0]["path"]["kind"]'), endpoint $(status a | field 'd["peers"][0]["endpoint"]'))" >&2
    echo "$bps $rtt"
}
read -r D_BPS D_RTT < <(measure direct)

# Cut the direct path: both fall back to the relay.
ip netns exec "$NA" nft -f - <<NFT
table ip cut {
  chain out { type filter hook output priority 0; ip daddr 192.0.2.11 drop; }
  chain in { type filter hook input priority 0; ip saddr 192.0.2.11 drop; }
}
NFT
for _ in $(seq 100); do
    [ "$(status a | field 'd["peers"][0]["path"]["kind"]')" = relay ] &&
        [ "$(status b | field 'd["peers"][0]["path"]["kind"]')" = relay ] && break
    sleep 0.1
done
metric() { ip netns exec "$RL" curl -s http://127.0.0.1:9478/metrics | sed -n "s/^$1 //p"; }
cpu() { awk '{print $14 + $15}' "/proc/$RELAY_PID/stat"; }
BYTES0=$(metric istmesh_relay_forwarded_bytes_total)
CPU0=$(cpu)
read -r R_BPS R_RTT < <(measure relay)
BYTES1=$(metric istmesh_relay_forwarded_bytes_total)
CPU1=$(cpu)
if [ -n "${RELAY_METRICS:-}" ]; then ip netns exec "$RL" curl -s http://127.0.0.1:9478/metrics | grep "^istmesh_relay" >&2; fi
TICKS=$(getconf CLK_TCK)
python3 - "$D_BPS" "$D_RTT" "$R_BPS" "$R_RTT" "$BYTES0" "$BYTES1" "$CPU0" "$CPU1" "$TICKS" <<'PY'
import sys
d_bps, d_rtt, r_bps, r_rtt = (float(x) for x in sys.argv[1:5])
b0, b1, c0, c1, hz = (float(x) for x in sys.argv[5:10])
gb = (b1 - b0) / 1e9
cpu = (c1 - c0) / hz
per_gb = cpu / gb if gb > 0 else float("nan")
print(f"relay forwarded {gb:.2f} GB with {cpu:.2f} CPU-s")
print(f"relay: {r_bps:.0f} Mbit/s ({r_bps / d_bps:.2f}x direct's {d_bps:.0f} Mbit/s), "
      f"rtt {r_rtt:.3f} ms (direct {d_rtt:.3f} ms), {per_gb:.2f} CPU-s per GB forwarded")
PY
