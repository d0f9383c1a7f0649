#!/usr/bin/env python3
"""Idle clients of the gateway (python3 standard library only).

Opens --count connections to --host:--port, each sending what --kind says
and then nothing more, and watches for up to --wait seconds when the gateway
closes each. Prints one line `opened` (flushed) once every connection is
open, then one JSON line: how many were opened, closed, closed within 0.5 s
of opening ("at_once"), still open, and the latest close time (seconds from
the connection's opening).

Kinds: nothing; half-preface (half of the HTTP/2 client preface); preface
(the preface and an empty SETTINGS frame); http1 (one HTTP/1.1 keep-alive
request, its answer read, then idle); tls-h2 (TLS with ALPN h2, preface and
SETTINGS, no request).
"""
import argparse, json, selectors, socket, ssl, time

p = argparse.ArgumentParser()
p.add_argument("--host", required=True)
p.add_argument("--port", type=int, required=True)
p.add_argument("--count", type=int, required=True)
p.add_argument("--kind", required=True)
p.add_argument("--sni", default="")
p.add_argument("--wait", type=float, required=True)
a = p.parse_args()

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"

ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["h2"])


def open_one():
    s = socket.create_connection((a.host, a.port), timeout=5)
    if a.kind == "half-preface":
        s.sendall(PREFACE[:12])
    elif a.kind == "preface":
        s.sendall(PREFACE + SETTINGS)
    elif a.kind == "http1":
        s.sendall(b"GET /who HTTP/1.1\r\nHost: " + a.sni.encode() + b"\r\n\r\n")
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    elif a.kind == "tls-h2":
        s = ctx.wrap_socket(s, server_hostname=a.sni)
        s.sendall(PREFACE + SETTINGS)
    elif a.kind != "nothing":
        raise SystemExit("unknown kind " + a.kind)
    s.setblocking(False)
    return s


sel = selectors.DefaultSelector()
opened_at = {}
closed = {}
for i in range(a.count):
    try:
        s = open_one()
    except (OSError, ssl.SSLError):
        closed[i] = 0.0
        continue
    opened_at[i] = time.monotonic()
    sel.register(s, selectors.EVENT_READ, i)
print("opened", flush=True)

deadline = time.monotonic() + a.wait
while sel.get_map() and time.monotonic() < deadline:
    for key, _ in sel.select(timeout=0.2):
        s, i = key.fileobj, key.data
        try:
            data = s.recv(65536)
        except (ssl.SSLWantReadError, BlockingIOError):
            continue
        except (OSError, ssl.SSLError):
            data = b""
        if not data:
            closed[i] = time.monotonic() - opened_at[i]
            sel.unregister(s)
            s.close()

times = list(closed.values())
print(json.dumps({
    "opened": len(opened_at),
    "closed": len(closed),
    "at_once": sum(1 for t in times if t < 0.5),
    "still_open": len(sel.get_map()),
    "max_close_s": max(times, default=0.0),
}), flush=True)
