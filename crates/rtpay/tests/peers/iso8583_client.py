"""An ISO 8583 network peer for rtpay's tests, built on PyPI pyiso8583 (independent of rtpay's
codec). Usage: iso8583_client.py HOST PORT [CA [CERT KEY]]: with CA, over TLS (Python's ssl,
the server checked against CA as `localhost`; with CERT and KEY, presenting that client
certificate); then one JSON command per line on stdin, one JSON answer per line on stdout:

  {"op": "send", "msg": {"t": "0100", "2": "...", ...}}   encode with specs.default_ascii, frame, send
  {"op": "raw", "hex": "..."}                             send these bytes as they are
  {"op": "recv", "n": 2}                                  read n framed answers, decode them
  {"op": "close"}

Answers: {"ok": true} for sends; {"messages": [{...}, ...]} or {"closed": true, "messages": [...]}
for receives; {"error": "..."} when pyiso8583 refuses to encode or decode.
"""

import json
import socket
import ssl
import struct
import sys

import iso8583
from iso8583.specs import default_ascii as spec


def read_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def connect(argv):
    sock = socket.create_connection((argv[1], int(argv[2])), timeout=20)
    if len(argv) > 3:
        context = ssl.create_default_context(cafile=argv[3])
        if len(argv) > 5:
            context.load_cert_chain(argv[4], argv[5])
        sock = context.wrap_socket(sock, server_hostname="localhost")
    return sock


def main():
    try:
        sock = connect(sys.argv)
    except OSError as e:
        # Every command is answered with why the connection could not be made.
        for _ in sys.stdin:
            print(json.dumps({"error": "connect: " + str(e)}), flush=True)
        return
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "send":
                raw, _ = iso8583.encode(dict(cmd["msg"]), spec)
                sock.sendall(struct.pack(">H", len(raw)) + bytes(raw))
                out = {"ok": True}
            elif op == "raw":
                sock.sendall(bytes.fromhex(cmd["hex"]))
                out = {"ok": True}
            elif op == "recv":
                messages = []
                out = {"messages": messages}
                for _ in range(cmd["n"]):
                    head = read_exact(sock, 2)
                    if head is None:
                        out["closed"] = True
                        break
                    body = read_exact(sock, struct.unpack(">H", head)[0])
                    if body is None:
                        out["closed"] = True
                        break
                    decoded, _ = iso8583.decode(body, spec)
                    decoded.pop("p", None)
                    decoded.pop("1", None)
                    messages.append(decoded)
            elif op == "close":
                sock.close()
                out = {"ok": True}
            else:
                out = {"error": "unknown op " + op}
        except (iso8583.EncodeError, iso8583.DecodeError, OSError) as e:
            out = {"error": str(e)}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
