"""A DNS responder for the flood and soak benchmarks (lab code, not the product).

Answers every UDP and TCP query on ``address``:53 at once, built by hand from the query: at
20,000 replies a second dnspython's message building would take a core of the benchmark's two,
and what this sends is simple (one answer, a pointer to the question). By question name:
- ``bad-*``: a malformed reply (an answer whose name points at itself, or an rdata cut short);
- under ``allowed-registry.test``: A 198.51.100.x or AAAA 2001:db8:ffff::x, x from the name's
  hash (one-off names get one-off IPv6 addresses: the soak's learned set keeps moving);
- anything else: A 192.0.2.x or AAAA 2001:db8:eeee::x.
TTL from the command line. Usage: dns_responder.py ADDRESS TTL
"""

import socket
import struct
import sys
import threading
import zlib

ALLOWED_SUFFIX = b"\x10allowed-registry\x04test\x00"
A, AAAA = 1, 28


def answer(query: bytes, ttl: int) -> bytes | None:
    if len(query) < 17 or query[2] & 0x80:
        return None
    end = query.find(b"\0", 12)
    if end < 0 or end + 5 > len(query):
        return None
    qname, qtype = query[12 : end + 1], struct.unpack_from("!H", query, end + 1)[0]
    header = query[:2] + b"\x81\x80" + struct.pack("!HHHH", 1, 1, 0, 0)
    question = query[12 : end + 5]
    h = zlib.crc32(qname)
    if qname.startswith(b"\x03bad") or qname[1:4] == b"bad":
        if h & 1:  # the answer's name is a pointer to itself
            at = 12 + len(question)
            return header + question + struct.pack("!H", 0xC000 | at) + struct.pack("!HHIH", A, 1, ttl, 4) + b"\xc6\x33\x64\x01"
        return header + question + b"\xc0\x0c" + struct.pack("!HHIH", A, 1, ttl, 4) + b"\xc6"  # rdata cut short
    allowed = qname.endswith(ALLOWED_SUFFIX)
    if qtype == AAAA:
        rdata = bytes.fromhex("20010db8ffff" if allowed else "20010db8eeee") + struct.pack("!HI", 0, h) + b"\0\0\0\x01"
        rtype = AAAA
    else:
        rdata = bytes([198, 51, 100, 1 + h % 250]) if allowed else bytes([192, 0, 2, 1 + h % 250])
        rtype = A
    return header + question + b"\xc0\x0c" + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def serve_udp(s: socket.socket, ttl: int) -> None:
    while True:
        query, peer = s.recvfrom(4096)
        reply = answer(query, ttl)
        if reply is not None:
            s.sendto(reply, peer)


def serve_tcp_client(conn: socket.socket, ttl: int) -> None:
    buffer = b""
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buffer += data
            out = []
            while len(buffer) >= 2 and len(buffer) >= 2 + struct.unpack_from("!H", buffer)[0]:
                length = struct.unpack_from("!H", buffer)[0]
                reply = answer(buffer[2 : 2 + length], ttl)
                buffer = buffer[2 + length :]
                if reply is not None:
                    out.append(struct.pack("!H", len(reply)) + reply)
            if out:
                conn.sendall(b"".join(out))


def serve_tcp(s: socket.socket, ttl: int) -> None:
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve_tcp_client, args=(conn, ttl), daemon=True).start()


if __name__ == "__main__":
    address, ttl = sys.argv[1], int(sys.argv[2])
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    udp.bind((address, 53))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((address, 53))
    tcp.listen(64)
    threading.Thread(target=serve_tcp, args=(tcp, ttl), daemon=True).start()
    print("ready", flush=True)
    serve_udp(udp, ttl)
