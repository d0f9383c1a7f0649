#!/usr/bin/env bash
# Gateway benchmark: `sidecar gateway` against nginx (Debian) set up as a
# reverse proxy to the same two backends over the same mesh, in one run.
#
# Namespaces on a bridge (underlay 203.0.113.0/24, overlay 10.240.0.0/22
# inside them only): a keyserver; a gateway host running both our gateway
# (ports 80, 443, 10000) and nginx (18080, 18443, 20000), which reaches the
# backends through the gateway's TUN, i.e. the same WireGuard path; two
# backend hosts, each `sidecar up` beside nginx answering `ok` on 8080 and a
# byte sink on 9000; a client host with wrk and socat.
#
#   sudo benches/gateway.sh              # ROUNDS=3, DURATION=10 s per wrk run
#   ROUNDS=5 DURATION=5 CONNS=64 sudo benches/gateway.sh
#   ONLY="handshakes" ROUNDS=1 sudo benches/gateway.sh   # some measures only
#       (any of: http https handshakes full resumed stream idle)
#
# Measures: HTTP requests/s and p99 latency, plain and over TLS (keep-alive,
# wrk -t2 -c$CONNS), new TLS handshakes/s (`Connection: close` on every
# request; wrk keeps its TLS session, so these are mostly resumptions),
# full and resumed TLS handshakes/s on their own (`openssl s_time -new` and
# `-reuse`, two clients at once), one TCP-mode stream's throughput (TLS
# terminated, 512 MiB through socat), and the memory each idle TLS
# connection costs the server (RSS of our gateway and of nginx's processes,
# before and after IDLE_CONNS handshaken connections that send nothing),
# alternating ours and nginx for ROUNDS rounds; prints the
# median of each figure, every run, and the ratios ours/nginx. A benchmark,
# not a test: it never fails on speed. Needs root, wrk, nginx with the
# stream module (libnginx-mod-stream), socat, openssl, curl, python3.
set -euo pipefail

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
STREAM_MB=${STREAM_MB:-512}
IDLE_CONNS=${IDLE_CONNS:-2000}
ONLY=${ONLY:-http https handshakes full resumed stream idle}
wanted() { case " $ONLY " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TAG=$$
HUB=gwb${TAG}hub
NSS=(gwb${TAG}ks gwb${TAG}gw gwb${TAG}b1 gwb${TAG}b2 gwb${TAG}cl)
KS=${NSS[0]} GW=${NSS[1]} B1=${NSS[2]} B2=${NSS[3]} CL=${NSS[4]}
IPS=(203.0.113.1 203.0.113.2 203.0.113.3 203.0.113.4 203.0.113.5)
GW_IP=${IPS[1]}
FQDN=bench.apps.ist-mesh.internal
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
    rm -f /var/run/wireguard/gwb"${TAG}"*.sock
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "gateway.sh: needs root" >&2; exit 1; }
for tool in wrk nginx socat openssl curl python3; do
    command -v "$tool" >/dev/null || { echo "gateway.sh: needs $tool" >&2; exit 1; }
done
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] ||
    { echo "gateway.sh: needs nginx's stream module (apt-get install libnginx-mod-stream)" >&2; exit 1; }

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
    ip link add "gv${TAG}$i" netns "$ns" type veth peer name "gb${TAG}$i" netns "$HUB"
    ip -n "$HUB" link set "gb${TAG}$i" master br0 up
    ip -n "$ns" addr add "${IPS[$i]}/24" dev "gv${TAG}$i"
    ip -n "$ns" link set "gv${TAG}$i" up
    ip -n "$ns" link set lo up
done
inns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# Keyserver, network, the group (no queueing: both proxies take every request).
inns "$KS" "$KEYSERVER" serve --data-dir "$WORK/ks" --quic-listen "${IPS[0]}:7000" \
    --api-listen 127.0.0.1:7001 >"$WORK/ks.log" 2>&1 &
for _ in $(seq 100); do [ -s "$WORK/ks/api.url" ] && break; sleep 0.1; done
admin() { inns "$KS" "$KEYSERVER" --data-dir "$WORK/ks" "$@"; }
admin network create prod >/dev/null
admin service create bench --network prod --fqdn "$FQDN" -p 80:8080/http -p 443:8080/http+tls \
    -p 10000:9000/tls --soft-limit 65535 --hard-limit 65535 >/dev/null
token() { admin token create --network prod --uses "$1" "${@:2}" | sed -n 's/.*"token": "\(istm1[^"]*\)".*/\1/p'; }

# The test CA and the wildcard certificate.
(
    cd "$WORK"
    printf 'subjectAltName=DNS:*.apps.ist-mesh.internal\n' >ext.cnf
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=bench-ca 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout gw.key -out gw.csr -subj "/CN=*.apps.ist-mesh.internal" 2>/dev/null
    openssl x509 -req -in gw.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out gw.pem -days 2 -extfile ext.cnf 2>/dev/null
)

# Backends: nginx `ok` on 8080, a byte sink on 9000, a sidecar in the group.
BACKEND_TOKEN=$(token 2 --service-group bench)
for b in "$B1" "$B2"; do
    cat >"$WORK/$b.conf" <<EOF
user root; worker_processes 1; pid $WORK/$b.pid; error_log $WORK/$b.err;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $WORK/$b.tmp; proxy_temp_path $WORK/$b.tmp;
  fastcgi_temp_path $WORK/$b.tmp; uwsgi_temp_path $WORK/$b.tmp; scgi_temp_path $WORK/$b.tmp;
  keepalive_requests 100000;
  server { listen 8080 reuseport; location / { return 200 "ok\n"; } } }
EOF
    inns "$b" nginx -c "$WORK/$b.conf" -g 'daemon off;' &
    inns "$b" socat -u TCP-LISTEN:9000,reuseaddr,fork OPEN:/dev/null &
    inns "$b" "$SIDECAR" up --token "$BACKEND_TOKEN" --service bench --instance "$b" \
        --port 8080 --port 9000 --state-dir "$WORK/$b.state" --interface "gwb${TAG}${b: -2}" \
        --hosts-file "" --no-dns --metrics off >"$WORK/$b.log" 2>&1 &
done

# Our gateway, then nginx on the same host and path.
inns "$GW" "$SIDECAR" gateway --token "$(token 1)" --interface "gwb${TAG}gw" \
    --tls-cert "$WORK/gw.pem" --tls-key "$WORK/gw.key" --metrics 127.0.0.1:9478 \
    --handshake-timeout 60s --max-connections-per-client 100000 \
    >"$WORK/gw.log" 2>&1 &
mkdir -p "/etc/netns/$CL"
printf '127.0.0.1 localhost\n%s %s\n' "$GW_IP" "$FQDN" >"/etc/netns/$CL/hosts"
for _ in $(seq 200); do
    [ "$(inns "$CL" curl -s -o /dev/null -w '%{http_code}' "http://$FQDN/")" = 200 ] && break
    sleep 0.2
done
UP=$(admin member list --network prod --json | python3 -c '
import json, sys
print(" ".join(m["ip"] for m in json.load(sys.stdin) if m["service"] == "bench"))')
[ "$(echo "$UP" | wc -w)" = 2 ] || { echo "gateway.sh: backends not found: $UP" >&2; cat "$WORK/gw.log" >&2; exit 1; }
# shellcheck disable=SC2086
set -- $UP
# nginx speaks TLS 1.2 and 1.3 (the default of nginx 1.23.4 and later), as
# our gateway does, so clients negotiate TLS 1.3 with both. Port 18444 keeps
# Debian's nginx 1.22 default (TLS 1.0-1.2 only) for the handshake measure
# alone: a resumed TLS 1.2 session skips the key exchange TLS 1.3 keeps.
LOC='location / { proxy_pass http://backends; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme; }'
cat >"$WORK/gw-nginx.conf" <<EOF
user root; worker_processes 2; pid $WORK/gwn.pid; error_log $WORK/gwn.err;
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
events { worker_connections 16384; }
http { access_log off; client_body_temp_path $WORK/gwn.tmp; proxy_temp_path $WORK/gwn.tmp;
  fastcgi_temp_path $WORK/gwn.tmp; uwsgi_temp_path $WORK/gwn.tmp; scgi_temp_path $WORK/gwn.tmp;
  keepalive_requests 100000; ssl_session_cache shared:SSL:10m;
  ssl_certificate $WORK/gw.pem; ssl_certificate_key $WORK/gw.key;
  upstream backends { server $1:8080; server $2:8080; keepalive 128; }
  server { listen 18080; listen 18443 ssl; ssl_protocols TLSv1.2 TLSv1.3; $LOC }
  server { listen 18444 ssl; ssl_protocols TLSv1 TLSv1.1 TLSv1.2; $LOC } }
stream { upstream sinks { server $1:9000; server $2:9000; }
  server { listen 20000 ssl; ssl_protocols TLSv1.2 TLSv1.3; ssl_certificate $WORK/gw.pem;
    ssl_certificate_key $WORK/gw.key; proxy_pass sinks; } }
EOF
inns "$GW" nginx -c "$WORK/gw-nginx.conf" -g 'daemon off;' &
for _ in $(seq 100); do
    [ "$(inns "$CL" curl -s -o /dev/null -w '%{http_code}' "http://$FQDN:18080/")" = 200 ] && break
    sleep 0.1
done

# wrk: requests/s and p99 (ms).
bench() {
    local out
    out=$(inns "$CL" wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency "$@" 2>&1)
    local rps p99
    rps=$(echo "$out" | sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p')
    p99=$(echo "$out" | awk '$1 == "99%" { v = $2; if (v ~ /us$/) { sub(/us/, "", v); v /= 1000 } else if (v ~ /ms$/) { sub(/ms/, "", v) } else if (v ~ /s$/) { sub(/s/, "", v); v *= 1000 } print v }')
    echo "${rps:-0} ${p99:-0}"
}
stream() {
    local start end
    start=$(date +%s.%N)
    head -c "$((STREAM_MB * 1048576))" /dev/zero |
        inns "$CL" socat -u - "OPENSSL:$FQDN:$1,verify=0,snihost=$FQDN" 2>/dev/null
    end=$(date +%s.%N)
    echo "$STREAM_MB $start $end" | awk '{ printf "%.0f", $1 * 8 * 1.048576 / ($3 - $2) }'
}

# Full (`-new`) or resumed (`-reuse`) TLS handshakes/s: two `openssl
# s_time` clients at once for DURATION s, connections over real seconds
# summed. No SNI: both servers show their one certificate. Each connection
# fetches `/` (`-www`, an HTTP/1.0 request without Host: a 400 from both),
# so the client reads what follows the handshake, TLS 1.3's session
# ticket included: without it, `-reuse` would have nothing to resume.
s_time() { # port -new|-reuse
    local pa
    inns "$CL" openssl s_time -connect "$FQDN:$1" "$2" -www / -time "$DURATION" >"$WORK/st.a" 2>/dev/null &
    pa=$!
    inns "$CL" openssl s_time -connect "$FQDN:$1" "$2" -www / -time "$DURATION" >"$WORK/st.b" 2>/dev/null || true
    wait "$pa" || true
    cat "$WORK/st.a" "$WORK/st.b" | awk '/connections in [0-9]+ real seconds/ { n += $1; t = $4 > t ? $4 : t } END { if (t > 0) printf "%.0f", n / t; else print 0 }'
}

# RSS (KiB) of our gateway, or of nginx's master and workers.
rss() {
    local pids
    if [ "$1" = ours ]; then
        pids=$(for p in $(ip netns pids "$GW"); do [ "$(cat "/proc/$p/comm" 2>/dev/null)" = sidecar ] && echo "$p"; done)
    else
        pids="$(cat "$WORK/gwn.pid") $(pgrep -P "$(cat "$WORK/gwn.pid")" | tr '\n' ' ')"
    fi
    for p in $pids; do awk '/^VmRSS/ { print $2 }' "/proc/$p/status"; done | awk '{ s += $1 } END { print s + 0 }'
}

# Memory per idle TLS connection (bytes): IDLE_CONNS connections that
# finish their TLS handshake and send nothing, held while RSS is read.
cat >"$WORK/idle.py" <<'PYEOF'
import socket, ssl, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
held = []
for _ in range(n):
    s = socket.create_connection((host, port), timeout=10)
    held.append(ctx.wrap_socket(s, server_hostname=host))
print("open", flush=True)
sys.stdin.readline()
PYEOF
idle_mem() { # who port
    local before after
    before=$(rss "$1")
    coproc IDLE { inns "$CL" python3 "$WORK/idle.py" "$FQDN" "$2" "$IDLE_CONNS"; }
    read -r _ <&"${IDLE[0]}"
    sleep 1
    after=$(rss "$1")
    echo >&"${IDLE[1]}"
    wait "$IDLE_PID" 2>/dev/null || true
    awk -v a="$after" -v b="$before" -v n="$IDLE_CONNS" 'BEGIN { printf "%.0f", (a - b) * 1024 / n }'
}

# Whether a client that kept its session resumes it (wrk keeps its
# connection's session across reconnects, so the handshake measure counts
# resumptions where a server allows them).
resumes() {
    local sess=$WORK/sess.$1
    rm -f "$sess"
    printf 'GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$FQDN" |
        inns "$CL" openssl s_client -connect "$FQDN:$1" -servername "$FQDN" -sess_out "$sess" -ign_eof >/dev/null 2>&1 || true
    [ -s "$sess" ] || { echo no; return; }
    printf 'GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$FQDN" |
        inns "$CL" openssl s_client -connect "$FQDN:$1" -servername "$FQDN" -sess_in "$sess" -ign_eof 2>/dev/null |
        grep -q '^Reused' && echo yes || echo no
}
echo "TLS session resumed by a returning client: ours $(resumes 443), nginx $(resumes 18443), nginx TLS <=1.2 $(resumes 18444)" >&2
if [ -n "${HOLD:-}" ]; then
    echo "holding for $HOLD s: client namespace $CL, $FQDN ours :443, nginx :18443 (work dir $WORK)" >&2
    sleep "$HOLD"
fi

# Rounds alternate ours and nginx on every measure (the machine is shared:
# load comes and goes); each figure is the median over the rounds.
echo "running $ROUNDS rounds (${DURATION} s per wrk run, $CONNS connections)..." >&2
: >"$WORK/results"
for round in $(seq "$ROUNDS"); do
    for who in ours nginx; do
        if [ "$who" = ours ]; then P80=80 P443=443 PTCP=10000; else P80=18080 P443=18443 PTCP=20000; fi
        if wanted http; then
            read -r rps p99 < <(bench "http://$FQDN:$P80/")
            echo "$who http $rps $p99" >>"$WORK/results"
        fi
        if wanted https; then
            read -r rps p99 < <(bench "https://$FQDN:$P443/")
            echo "$who https $rps $p99" >>"$WORK/results"
        fi
        if wanted handshakes; then
            read -r rps p99 < <(bench -H "Connection: close" "https://$FQDN:$P443/")
            echo "$who handshakes $rps $p99" >>"$WORK/results"
            if [ "$who" = nginx ]; then
                read -r rps p99 < <(bench -H "Connection: close" "https://$FQDN:18444/")
                echo "nginx handshakes12 $rps $p99" >>"$WORK/results"
            fi
        fi
        if wanted full; then
            echo "$who full $(s_time "$P443" -new) 0" >>"$WORK/results"
        fi
        if wanted resumed; then
            echo "$who resumed $(s_time "$P443" -reuse) 0" >>"$WORK/results"
        fi
        if wanted stream; then
            echo "$who stream $(stream "$PTCP") 0" >>"$WORK/results"
        fi
        if wanted idle; then
            echo "$who idle $(idle_mem "$who" "$P443") 0" >>"$WORK/results"
        fi
    done
    echo "round $round done" >&2
done
median() { # who measure column
    awk -v w="$1" -v m="$2" -v c="$3" '$1 == w && $2 == m { print $c }' "$WORK/results" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
O_HTTP=$(median ours http 3) O_HTTP99=$(median ours http 4)
N_HTTP=$(median nginx http 3) N_HTTP99=$(median nginx http 4)
O_TLS=$(median ours https 3) O_TLS99=$(median ours https 4)
N_TLS=$(median nginx https 3) N_TLS99=$(median nginx https 4)
O_HS=$(median ours handshakes 3) N_HS=$(median nginx handshakes 3) N_HS12=$(median nginx handshakes12 3)
O_STREAM=$(median ours stream 3) N_STREAM=$(median nginx stream 3)
O_FULL=$(median ours full 3) N_FULL=$(median nginx full 3)
O_RES=$(median ours resumed 3) N_RES=$(median nginx resumed 3)
O_IDLE=$(median ours idle 3) N_IDLE=$(median nginx idle 3)
echo "every run (who, measure, value, p99 ms):" >&2
cat "$WORK/results" >&2

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
printf '\n%-34s %14s %14s %8s\n' "measure (median of $ROUNDS)" "ours" "nginx" "ours/nginx"
printf '%-34s %14s %14s %8s\n' "HTTP req/s (keep-alive)" "$O_HTTP" "$N_HTTP" "$(ratio "$O_HTTP" "$N_HTTP")"
printf '%-34s %14s %14s %8s\n' "HTTP p99 ms" "$O_HTTP99" "$N_HTTP99" "$(ratio "$O_HTTP99" "$N_HTTP99")"
printf '%-34s %14s %14s %8s\n' "HTTPS req/s (keep-alive)" "$O_TLS" "$N_TLS" "$(ratio "$O_TLS" "$N_TLS")"
printf '%-34s %14s %14s %8s\n' "HTTPS p99 ms" "$O_TLS99" "$N_TLS99" "$(ratio "$O_TLS99" "$N_TLS99")"
printf '%-34s %14s %14s %8s\n' "new TLS handshakes/s" "$O_HS" "$N_HS" "$(ratio "$O_HS" "$N_HS")"
printf '%-34s %14s %14s %8s\n' "  nginx TLS <=1.2 only (1.22 default)" "$O_HS" "$N_HS12" "$(ratio "$O_HS" "$N_HS12")"
printf '%-34s %14s %14s %8s\n' "full TLS handshakes/s (s_time -new)" "$O_FULL" "$N_FULL" "$(ratio "$O_FULL" "$N_FULL")"
printf '%-34s %14s %14s %8s\n' "resumed TLS handshakes/s (-reuse)" "$O_RES" "$N_RES" "$(ratio "$O_RES" "$N_RES")"
printf '%-34s %14s %14s %8s\n' "TCP mode, one stream, Mbit/s" "$O_STREAM" "$N_STREAM" "$(ratio "$O_STREAM" "$N_STREAM")"
printf '%-34s %14s %14s %8s\n' "bytes per idle TLS connection" "$O_IDLE" "$N_IDLE" "$(ratio "$O_IDLE" "$N_IDLE")"
echo "gateway: HTTP $(ratio "$O_HTTP" "$N_HTTP")x nginx req/s (p99 $O_HTTP99 vs $N_HTTP99 ms), HTTPS $(ratio "$O_TLS" "$N_TLS")x (p99 $O_TLS99 vs $N_TLS99 ms), handshakes $(ratio "$O_HS" "$N_HS")x ($(ratio "$O_HS" "$N_HS12")x against TLS <=1.2 only), TCP stream $(ratio "$O_STREAM" "$N_STREAM")x"
