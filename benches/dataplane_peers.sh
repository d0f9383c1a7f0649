#!/usr/bin/env bash
# Data-plane benchmark with many peers: one server and PEERS clients (8),
# each in its own namespace on one bridged underlay, every one running our
# engine (`ist-wg`, configured with `wg set`). Every client sends one iperf3
# TCP stream to the server at once, so the server opens PEERS peers' traffic;
# the sum of the streams is measured without crypto workers and with WORKERS
# (2), alternating, ROUNDS times (2).
#
# Needs root, iperf3, wg. Creates and removes its own namespaces; underlay
# 198.51.100.0/24, overlay 10.240.0.0/22 inside them only.
#
#   sudo benches/dataplane_peers.sh
#   PEERS=4 WORKERS=3 DURATION=8 benches/dataplane_peers.sh
#
# Ends with: peers: <n> peers, <without> Mbit/s without workers, <with>
# Mbit/s with <w> (<ratio>x). A benchmark, not a test: it never fails on
# speed.
set -euo pipefail

PEERS=${PEERS:-8}
WORKERS=${WORKERS:-2}
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TAG=$$
HUB=dppeers${TAG}h
WORK=$(mktemp -d)
NAMES=(s)
for i in $(seq 1 "$PEERS"); do NAMES+=("c$i"); done

ns() { echo "dppeers${TAG}$1"; }
ifname() { echo "wp${TAG}$1"; }

cleanup() {
    for n in "${NAMES[@]}" h; do
        local space
        space=$(ns "$n")
        for pid in $(ip netns pids "$space" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$space" 2>/dev/null || true
        rm -f "/var/run/wireguard/$(ifname "$n").sock"
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "dataplane_peers.sh: needs root" >&2; exit 1; }
for tool in iperf3 wg; do
    command -v "$tool" >/dev/null || { echo "dataplane_peers.sh: needs $tool" >&2; exit 1; }
done
[ "$PEERS" -ge 1 ] && [ "$PEERS" -le 50 ] || { echo "PEERS: 1 to 50" >&2; exit 1; }

echo "building ours (release)..." >&2
(cd "$ROOT" && cargo build --release -q -p ist-mesh --bin ist-wg)
OURS=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release/ist-wg
[ -x "$OURS" ] || OURS="$ROOT/target/release/ist-wg"

# The underlay: a bridge in the hub, one veth per namespace; server .1,
# client i at .(10+i); overlay the same way in 10.240.0.0/22.
ip netns add "$HUB"
ip -n "$HUB" link add br0 type bridge
ip -n "$HUB" link set br0 up
umask 077
k=0
for n in "${NAMES[@]}"; do
    space=$(ns "$n")
    ip netns add "$space"
    ip link add "rp${TAG}$k" netns "$space" type veth peer name "hp${TAG}$k" netns "$HUB"
    ip -n "$HUB" link set "hp${TAG}$k" master br0 up
    if [ "$n" = s ]; then host=1; else host=$((10 + ${n#c})); fi
    ip -n "$space" addr add "198.51.100.$host/24" dev "rp${TAG}$k"
    ip -n "$space" link set "rp${TAG}$k" up
    ip -n "$space" link set lo up
    wg genkey >"$WORK/$n.key"
    wg pubkey <"$WORK/$n.key" >"$WORK/$n.pub"
    echo "$host" >"$WORK/$n.host"
    k=$((k + 1))
done

# Starts every engine with $1 crypto workers and configures the mesh.
up() {
    local workers=$1 n space host
    for n in "${NAMES[@]}"; do
        IST_WG_CRYPTO_WORKERS=$workers ip netns exec "$(ns "$n")" "$OURS" "$(ifname "$n")" >/dev/null 2>&1
    done
    for n in "${NAMES[@]}"; do
        for _ in $(seq 1 100); do [ -S "/var/run/wireguard/$(ifname "$n").sock" ] && break; sleep 0.05; done
    done
    local args=()
    for n in "${NAMES[@]:1}"; do
        host=$(cat "$WORK/$n.host")
        args+=(peer "$(cat "$WORK/$n.pub")" allowed-ips "10.240.0.$host/32" endpoint "198.51.100.$host:51820")
    done
    ip netns exec "$(ns s)" wg set "$(ifname s)" private-key "$WORK/s.key" listen-port 51820 "${args[@]}"
    for n in "${NAMES[@]}"; do
        space=$(ns "$n")
        host=$(cat "$WORK/$n.host")
        if [ "$n" != s ]; then
            ip netns exec "$space" wg set "$(ifname "$n")" private-key "$WORK/$n.key" listen-port 51820 \
                peer "$(cat "$WORK/s.pub")" allowed-ips 10.240.0.1/32 endpoint 198.51.100.1:51820
        fi
        ip -n "$space" addr add "10.240.0.$host/22" dev "$(ifname "$n")"
        ip -n "$space" link set "$(ifname "$n")" mtu 1420 up
    done
}

down() {
    local n space
    for n in "${NAMES[@]}"; do
        space=$(ns "$n")
        ip -n "$space" link del "$(ifname "$n")" 2>/dev/null || true
        for pid in $(ip netns pids "$space" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
    done
    for n in "${NAMES[@]}"; do
        space=$(ns "$n")
        for _ in $(seq 1 60); do [ -z "$(ip netns pids "$space")" ] && break; sleep 0.05; done
        rm -f "/var/run/wireguard/$(ifname "$n").sock"
    done
}

# Every client's stream to the server at once: the sum of the receivers'
# Mbit/s.
measure() {
    local i port
    for i in $(seq 1 "$PEERS"); do
        ip netns exec "$(ns s)" iperf3 -s -D -p $((5200 + i)) >/dev/null 2>&1
    done
    sleep 0.3
    for i in $(seq 1 "$PEERS"); do
        ip netns exec "$(ns "c$i")" ping -c 2 -i 0.2 -W 2 10.240.0.1 >/dev/null 2>&1 || true
    done
    for i in $(seq 1 "$PEERS"); do
        port=$((5200 + i))
        ip netns exec "$(ns "c$i")" iperf3 -c 10.240.0.1 -p "$port" -t "$DURATION" -f m \
            >"$WORK/out$i" 2>/dev/null &
    done
    wait
    for i in $(seq 1 "$PEERS"); do
        awk '/receiver/ { v = $(NF-2) } END { if (v == "") v = 0; print v }' "$WORK/out$i"
    done | awk '{ s += $1 } END { printf "%.0f", s }'
    for pid in $(ip netns pids "$(ns s)" 2>/dev/null); do
        [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = iperf3 ] && kill "$pid" 2>/dev/null || true
    done
    sleep 0.3
}

without=()
with=()
for r in $(seq 1 "$ROUNDS"); do
    echo "round $r: without workers..." >&2
    up 0
    without+=("$(measure)")
    down
    echo "round $r: with $WORKERS workers..." >&2
    up "$WORKERS"
    with+=("$(measure)")
    down
done
echo "rounds (Mbit/s, sum of $PEERS streams): without ${without[*]}; with $WORKERS workers ${with[*]}"
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
A=$(median "${without[@]}")
B=$(median "${with[@]}")
echo "peers: $PEERS peers, $A Mbit/s without workers, $B Mbit/s with $WORKERS ($(awk -v a="$B" -v b="$A" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')x)"
