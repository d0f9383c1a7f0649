#!/usr/bin/env python3
"""A WebSocket client (python3 standard library): TLS to HOST:PORT with
SNI NAME and the CA file, upgrade on /ws, send one masked text frame,
print the echoed text. Exit 1 on any failure."""
import base64, os, socket, ssl, sys

host, port, name, ca, text = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(["http/1.1"])
raw = socket.create_connection((host, port), timeout=10)
s = ctx.wrap_socket(raw, server_hostname=name)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall((f"GET /ws HTTP/1.1\r\nHost: {name}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
head = b""
while b"\r\n\r\n" not in head:
    chunk = s.recv(1)
    if not chunk:
        sys.exit("closed during the handshake")
    head += chunk
if not head.startswith(b"HTTP/1.1 101"):
    sys.exit("no 101: " + head.decode(errors="replace"))
payload = text.encode()
mask = os.urandom(4)
s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload)))
b0, b1 = s.recv(2)
data = b""
while len(data) < (b1 & 0x7F):
    data += s.recv((b1 & 0x7F) - len(data))
print(data.decode())
s.sendall(bytes([0x88, 0x80]) + os.urandom(4))
