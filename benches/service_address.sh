#!/usr/bin/env bash
# Service-address benchmark, userspace mode (issue 19): connections/s and one
# stream's throughput through a service address against straight to a
# member's loopback address, in the same run. No root needed; every packet
# stays on loopback.
#
#   member:  client -> 127.0.0.1 (member listener of instance 1) -> client's
#            smoltcp stack -> WireGuard -> instance 1's stack -> sink server
#   vip-1:   client -> 127.251.4.1 (service address over instance 1 only:
#            the balancer's own cost) -> ... the same path
#   vip-3:   client -> 127.251.4.2 (service address over 3 instances)
#
# Connections/s: CONNS clients at once, each connecting, echoing one byte and
# closing, for DURATION seconds. Stream: one connection writing for DURATION
# seconds, counted by the sink. ROUNDS rounds alternating the paths, medians
# (examples/service_address_bench.rs, release build).
#
#   benches/service_address.sh                 # DURATION=5 ROUNDS=3 CONNS=8
#   DURATION=10 ROUNDS=5 benches/service_address.sh
#
# Ends with: service-address: <x>x conn/s, <y>x stream (1 instance); ...
# Targets: >= 0.9x connections/s, >= 0.95x stream. A benchmark, not a test:
# it never fails on speed.
set -euo pipefail

DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-8}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

echo "building (release)..." >&2
(cd "$ROOT" && cargo build --release -q --example service_address_bench)
TARGET=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
"${TARGET:-$ROOT/target}/release/examples/service_address_bench" "$DURATION" "$ROUNDS" "$CONNS"
