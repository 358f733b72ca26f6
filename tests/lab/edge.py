"""A shared TLS edge, as a CDN's: one address answering for several names, each with its own
certificate, chosen by the ClientHello's server name (Python's ``ssl``, an SNI callback). The lab,
never shipped: the root tests of the TLS server name check and the end-to-end shared-edge pulls.

Certificates come from a throw-away CA made with ``cryptography``; each connection is answered
by ``handler(conn, name)`` once its handshake is done (by default one line naming the server
name the client asked for, then close).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

EDGE4, EDGE6 = "203.0.113.50", "2001:db8::50"


class Authority:
    """A CA and the certificates it signs, written under ``directory``."""

    def __init__(self, directory: Path, cert=None, key=None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        if cert is not None:  # an existing CA (the registry lab's: the engine already trusts it)
            self.cert, self.key, self.ca = cert, key, None
            return
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ramfw edge CA")])
        self.cert = (self._builder(name, name, self.key.public_key())
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca = self.dir / "edge-ca.crt"
        self.ca.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    @classmethod
    def signed_by(cls, cert_file: Path, key_file: Path, directory: Path) -> "Authority":
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
        key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
        return cls(directory, cert, key)

    @staticmethod
    def _builder(subject, issuer, public_key):
        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=2)))

    def issue(self, host: str) -> tuple[Path, Path]:
        """(certificate, key) files for ``host``."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]), self.cert.subject,
                              key.public_key())
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
                .sign(self.key, hashes.SHA256()))
        cert_path, key_path = self.dir / f"{host}.crt", self.dir / f"{host}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path


def contexts(authority: Authority, hosts: list[str], asked: list | None = None) -> ssl.SSLContext:
    """A server context whose SNI callback picks each host's own certificate; a ClientHello
    naming none of them (or nothing) gets the first host's. ``asked``: every name a ClientHello
    that reached the server named ("" for none)."""
    by_name = {}
    for host in hosts:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*authority.issue(host))
        context.set_alpn_protocols(["http/1.1"])
        by_name[host] = context
    front = by_name[hosts[0]]

    def pick(conn: ssl.SSLSocket, name: str | None, _context) -> None:
        conn.requested_name = name or ""  # what the handler is told
        if asked is not None:
            asked.append(name or "")
        conn.context = by_name.get(name or "", front)

    front.sni_callback = pick
    return front


def greet(conn: ssl.SSLSocket, name: str) -> None:
    conn.sendall(f"hello from {name or '(no name)'}\n".encode())


class Edge:
    """TLS servers on ``addresses`` port ``port`` inside ``ns``, one thread per connection."""

    def __init__(self, ns, authority: Authority, hosts: list[str], addresses=(EDGE4, EDGE6), port: int = 443,
                 handler=greet):
        self.asked: list[str] = []  # the server names of the ClientHellos that reached it
        self.context = contexts(authority, hosts, self.asked)
        self.handler = handler
        self.sockets: list[socket.socket] = []
        self._stop = False
        with ns.inside():
            for address in addresses:
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                listener = socket.socket(family, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((address, port))
                listener.listen(256)
                listener.settimeout(0.2)
                self.sockets.append(listener)
        self.threads = [threading.Thread(target=self._accept, args=(s,), daemon=True) for s in self.sockets]
        for thread in self.threads:
            thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop:
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                self.handler(tls, getattr(tls, "requested_name", ""))
        except (OSError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        self._stop = True
        for thread in self.threads:
            thread.join(timeout=2)
        for listener in self.sockets:
            listener.close()


def add_addresses(lab, addresses=(EDGE4, EDGE6)) -> None:
    """The edge's addresses on the internet side of the lab's veth."""
    link = lab.net.run("ip", "-o", "link", "show", "type", "veth").stdout.split(":")[1].strip().split("@")[0]
    for address in addresses:
        prefix = 64 if ipaddress.ip_address(address).version == 6 else 24
        lab.net.run("ip", "addr", "add", f"{address}/{prefix}", "dev", link, *(["nodad"] if prefix == 64 else []))


PROXY4 = "203.0.113.60"


class ConnectProxy:
    """An HTTP proxy that knows only CONNECT (as the engine uses one for https registries): it
    resolves the host with ``resolve(name)`` (the lab's own map, not the VM's DNS), answers 200 and
    relays both ways."""

    def __init__(self, ns, resolve, address: str = PROXY4, port: int = 3128):
        self.ns, self.resolve = ns, resolve
        self.asked: list[str] = []  # the CONNECT targets it was asked for
        self._stop = False
        with ns.inside():
            self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((address, port))
        self.listener.listen(64)
        self.listener.settimeout(0.2)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        upstream = None
        try:
            request = b""
            while b"\r\n\r\n" not in request:
                data = conn.recv(4096)
                if not data:
                    return
                request += data
            method, target, _ = request.split(b"\r\n")[0].split(b" ")
            if method != b"CONNECT":
                conn.sendall(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                return
            self.asked.append(target.decode())
            host, _, port = target.decode().rpartition(":")
            with self.ns.inside():
                upstream = socket.create_connection((self.resolve(host), int(port)), timeout=10)
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            threading.Thread(target=_relay, args=(upstream, conn), daemon=True).start()
            _relay(conn, upstream)
        except (OSError, ValueError):
            pass
        finally:
            for s in (conn, upstream):
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.close()

    def close(self) -> None:
        self._stop = True
        self.thread.join(timeout=2)
        self.listener.close()


def _relay(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
