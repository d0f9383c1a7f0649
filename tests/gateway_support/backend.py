#!/usr/bin/env python3
"""A test instance behind the gateway (python3 standard library only).

HTTP/1.1 on --http (GET /who: the instance name; /headers: the request
headers as JSON; /slow?ms=N: answers after N ms; /ws: a WebSocket echo),
a TCP echo on --tcp (each line back, prefixed with the name) and a UDP
echo on --udp. Every request, connection (`conn`, HTTP) and datagram is counted in
<state>/<name>.log, one line each, so the test sees who served what.
"""
import argparse, base64, hashlib, json, socket, socketserver, struct, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs

p = argparse.ArgumentParser()
p.add_argument("--name", required=True)
p.add_argument("--http", type=int, default=8080)
p.add_argument("--tcp", type=int, default=9000)
p.add_argument("--udp", type=int, default=5353)
p.add_argument("--log", required=True)
a = p.parse_args()
lock = threading.Lock()
inflight = 0


def note(what):
    with lock, open(a.log, "a") as f:
        f.write(what + "\n")


def ws_echo(sock):
    """Echoes WebSocket frames (the client masks, we do not) until close."""
    def read(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf
    while True:
        b0, b1 = read(2)
        op, ln = b0 & 0x0F, b1 & 0x7F
        if ln == 126:
            ln = struct.unpack(">H", read(2))[0]
        elif ln == 127:
            ln = struct.unpack(">Q", read(8))[0]
        mask = read(4) if b1 & 0x80 else b"\0\0\0\0"
        data = bytes(c ^ mask[i % 4] for i, c in enumerate(read(ln)))
        if op == 8:
            sock.sendall(b"\x88\x00")
            return
        out = (a.name + ":").encode() + data
        sock.sendall(bytes([0x81, len(out)]) + out)


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def setup(self):
        # One line per accepted connection: the tests count how many
        # connections the gateway opened to this instance.
        note("conn")
        super().setup()

    def send_text(self, code, body, ctype="text/plain"):
        body = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        u = urlparse(self.path)
        note("http " + u.path)
        if u.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            key = self.headers["Sec-WebSocket-Key"]
            accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept)
            self.end_headers()
            self.wfile.flush()
            try:
                ws_echo(self.connection)
            except (EOFError, OSError):
                pass
            self.close_connection = True
            return
        if u.path == "/headers":
            self.send_text(200, json.dumps({k.lower(): v for k, v in self.headers.items()}), "application/json")
        elif u.path == "/slow":
            # "inflight N": slow requests being served at once, as this
            # one starts (the tests read the largest).
            global inflight
            with lock:
                inflight += 1
                n = inflight
            note("inflight %d" % n)
            ms = int(parse_qs(u.query).get("ms", ["1000"])[0])
            try:
                time.sleep(ms / 1000)
                self.send_text(200, a.name + "\n")
            finally:
                with lock:
                    inflight -= 1
        else:
            self.send_text(200, a.name + "\n")

    do_POST = do_GET


class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        note("tcp")
        for line in self.rfile:
            self.wfile.write((a.name + ":").encode() + line)
            self.wfile.flush()


class Udp(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        note("udp")
        sock.sendto((a.name + ":").encode() + data, self.client_address)


for cls in (socketserver.ThreadingTCPServer, socketserver.UDPServer, ThreadingHTTPServer):
    cls.allow_reuse_address = True
    cls.daemon_threads = True
servers = [
    ThreadingHTTPServer(("0.0.0.0", a.http), H),
    socketserver.ThreadingTCPServer(("0.0.0.0", a.tcp), Echo),
    socketserver.UDPServer(("0.0.0.0", a.udp), Udp),
]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
note("ready")
servers[0].serve_forever()
