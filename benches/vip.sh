#!/usr/bin/env bash
# Service-address benchmark, kernel mode: the same instance reached through
# its service's address (per-flow balancing in the client's engine) and
# straight at its member address, alternated in one run.
#
# Namespaces on a bridge (underlay 203.0.113.0/24, overlay 10.240.0.0/22 and
# the service range 10.240.4.0/22 inside them only): a keyserver; one `api`
# instance (`sidecar up`, kernel mode) with nginx answering `ok` on 8080 and
# iperf3 -s; a client (`sidecar up --service-addresses service`) with wrk
# and iperf3. One instance, so both paths end at the same server: the ratio
# is the cost of the service address in the data plane.
#
#   sudo benches/vip.sh                  # ROUNDS=3, DURATION=10 s per run
#   ROUNDS=5 DURATION=5 CONNS=32 sudo benches/vip.sh
#
# Measures: new connections/s (HTTP requests with `Connection: close`,
# wrk -t2 -c$CONNS: one TCP connection each) and one TCP stream's
# throughput (iperf3, client -> instance), service address then member
# address, ROUNDS times; prints every run, the medians and the ratios
# service/member. A benchmark, not a test: it never fails on speed. Needs
# root, wrk, nginx, iperf3, python3. The flow table's memory at 100 000
# flows: `cargo bench --bench vip_flows`.
set -euo pipefail

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-32}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TAG=$$
HUB=vpb${TAG}hub
NSS=(vpb${TAG}ks vpb${TAG}api vpb${TAG}cl)
KS=${NSS[0]} API=${NSS[1]} CL=${NSS[2]}
IPS=(203.0.113.1 203.0.113.2 203.0.113.3)
WORK=$(mktemp -d)
chmod 755 "$WORK"

cleanup() {
    for ns in "${NSS[@]}"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
    done
    sleep 1
    for ns in "${NSS[@]}" "$HUB"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "/etc/netns/$CL" "$WORK"
    rm -f /var/run/wireguard/vpb"${TAG}"*.sock
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "vip.sh: needs root" >&2; exit 1; }
for tool in wrk nginx iperf3 python3; do
    command -v "$tool" >/dev/null || { echo "vip.sh: needs $tool" >&2; exit 1; }
done

echo "building sidecar and keyserver (release)..." >&2
(cd "$ROOT" && cargo build --release -q -p sidecar -p keyserver)
TARGET=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
TARGET=${TARGET:-$ROOT/target}
SIDECAR=$TARGET/release/sidecar
KEYSERVER=$TARGET/release/keyserver

# The underlay: every host on one bridge.
ip netns add "$HUB"
ip -n "$HUB" link add br0 type bridge
ip -n "$HUB" link set br0 up
for i in "${!NSS[@]}"; do
    ns=${NSS[$i]}
    ip netns add "$ns"
    ip link add "vv${TAG}$i" netns "$ns" type veth peer name "vb${TAG}$i" netns "$HUB"
    ip -n "$HUB" link set "vb${TAG}$i" master br0 up
    ip -n "$ns" addr add "${IPS[$i]}/24" dev "vv${TAG}$i"
    ip -n "$ns" link set "vv${TAG}$i" up
    ip -n "$ns" link set lo up
done
inns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

inns "$KS" "$KEYSERVER" serve --data-dir "$WORK/ks" --quic-listen "${IPS[0]}:7000" \
    --api-listen 127.0.0.1:7001 >"$WORK/ks.log" 2>&1 &
for _ in $(seq 100); do [ -s "$WORK/ks/api.url" ] && break; sleep 0.1; done
admin() { inns "$KS" "$KEYSERVER" --data-dir "$WORK/ks" "$@"; }
admin network create prod >/dev/null
TOKEN=$(admin token create --network prod --uses 2 | sed -n 's/.*"token": "\(istm1[^"]*\)".*/\1/p')

# The instance: nginx `ok` on 8080, iperf3 -s, its sidecar.
cat >"$WORK/nginx.conf" <<EOF
user root; worker_processes 1; pid $WORK/nginx.pid; error_log $WORK/nginx.err;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $WORK/tmp; proxy_temp_path $WORK/tmp;
  fastcgi_temp_path $WORK/tmp; uwsgi_temp_path $WORK/tmp; scgi_temp_path $WORK/tmp;
  server { listen 8080 reuseport backlog=4096; location / { return 200 "ok\n"; } } }
EOF
inns "$API" nginx -c "$WORK/nginx.conf" -g 'daemon off;' &
inns "$API" iperf3 -s -p 5201 >/dev/null 2>&1 &
inns "$API" "$SIDECAR" up --token "$TOKEN" --service api --port 8080,5201 \
    --state-dir "$WORK/api.state" --interface "vpb${TAG}a" \
    --hosts-file "" --no-dns --metrics off >"$WORK/api.log" 2>&1 &

# The client: its hosts file gives api.warp the service address.
mkdir -p "/etc/netns/$CL"
printf '127.0.0.1 localhost\n' >"/etc/netns/$CL/hosts"
inns "$CL" "$SIDECAR" up --token "$TOKEN" --service client --service-addresses service \
    --state-dir "$WORK/cl.state" --interface "vpb${TAG}c" --no-dns --metrics off \
    >"$WORK/cl.log" 2>&1 &
VIP=""
for _ in $(seq 200); do
    VIP=$(inns "$CL" getent hosts api.warp | awk '{print $1}' || true)
    [ -n "$VIP" ] && break
    sleep 0.1
done
MEMBER=$(admin member list --network prod --json | python3 -c '
import json, sys
print(" ".join(m["ip"] for m in json.load(sys.stdin) if m["service"] == "api"))')
case "$VIP" in 10.240.4.*) ;; *) echo "vip.sh: no service address for api.warp (${VIP:-none})" >&2; cat "$WORK/cl.log" >&2; exit 1 ;; esac
[ -n "$MEMBER" ] || { echo "vip.sh: api member not found" >&2; exit 1; }
for addr in "$MEMBER" "$VIP"; do
    for _ in $(seq 200); do
        [ "$(inns "$CL" curl -s -m 2 "http://$addr:8080/" 2>/dev/null)" = ok ] && break
        sleep 0.2
    done
done
echo "api.warp = $VIP (service address), member $MEMBER" >&2

# New connections/s to $1 (requests with Connection: close).
conns() {
    inns "$CL" wrk -t2 -c"$CONNS" -d"${DURATION}s" -H 'Connection: close' "http://$1:8080/" 2>/dev/null |
        awk '/Requests\/sec/ { print int($2) }'
}
# One TCP stream client -> instance, receiver Mbit/s.
stream() {
    inns "$CL" iperf3 -c "$1" -p 5201 -t "$DURATION" -f m 2>/dev/null |
        awk '/receiver/ { for (i = 1; i <= NF; i++) if ($i == "Mbits/sec") print $(i - 1) }'
}
median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

declare -a CV CM SV SM
for r in $(seq "$ROUNDS"); do
    CV+=("$(conns "$VIP")")
    CM+=("$(conns "$MEMBER")")
    SV+=("$(stream "$VIP")")
    SM+=("$(stream "$MEMBER")")
    echo "round $r: conn/s service ${CV[-1]} member ${CM[-1]}; stream Mbit/s service ${SV[-1]} member ${SM[-1]}" >&2
done
FLOWS=$(inns "$CL" "$SIDECAR" status --json --state-dir "$WORK/cl.state" |
    python3 -c 'import json, sys; print(json.load(sys.stdin).get("service_flows"))')
echo "client's flow table: $FLOWS" >&2

cv=$(printf '%s\n' "${CV[@]}" | median)
cm=$(printf '%s\n' "${CM[@]}" | median)
sv=$(printf '%s\n' "${SV[@]}" | median)
sm=$(printf '%s\n' "${SM[@]}" | median)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "inf" }'; }
echo "| path | conn/s | 1 stream Mbit/s |"
echo "|---|---:|---:|"
echo "| service address | $cv | $sv |"
echo "| member address | $cm | $sm |"
echo "vip: conn/s $(ratio "$cv" "$cm")x, stream $(ratio "$sv" "$sm")x of the member address (medians of $ROUNDS)"
