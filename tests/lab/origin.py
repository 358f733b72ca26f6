"""A real HTTPS policy origin for the tests: Python's http.server behind TLS from a throw-away
CA made by openssl in the test's directory. Serves what ``files`` holds, with ETag and
Last-Modified when asked to, answers conditional GETs with 304, and records every request.

The lab, not the product. It listens on loopback, or on a test host inside a lab namespace.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.server
import ssl
import subprocess
import threading
import time
from pathlib import Path


def make_ca(where: Path, address: str) -> tuple[Path, Path, Path]:
    """(ca.crt, server.crt, server.key) for ``address`` (an IP address), valid a day."""
    ca_key, ca, key, csr, cert = (where / n for n in ("ca.key", "ca.crt", "srv.key", "srv.csr", "srv.crt"))
    if cert.exists():
        return ca, cert, key
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=ramfw test CA")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key,
        "-out", csr, "-subj", "/CN=policy origin")
    ext = where / "ext.cnf"
    ext.write_text(f"subjectAltName = IP:{address}\n")
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
        "-days", "1", "-extfile", ext)
    return ca, cert, key


class Origin:
    """``files``: path -> bytes. ``etag`` / ``last_modified``: send those validators.
    ``answer``: path -> (status, headers) to send instead (a 503 with Retry-After, a redirect).
    ``requests``: (time, method, path, headers) of every request."""

    def __init__(self, where: Path, address: str = "127.0.0.1", port: int = 0, tls: bool = True, netns=None):
        self.files: dict[str, bytes] = {}
        self.etag, self.last_modified = True, True
        self.answer: dict[str, tuple[int, dict]] = {}
        self.requests: list[tuple[float, str, str, dict]] = []
        self.modified: dict[str, float] = {}
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                origin.requests.append((time.monotonic(), "GET", self.path, dict(self.headers)))
                if self.path in origin.answer:
                    status, headers = origin.answer[self.path]
                    self.send_response(status)
                    for name, value in {**headers, "Content-Length": "0"}.items():
                        self.send_header(name, value)
                    self.end_headers()
                    return
                body = origin.files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                tag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
                stamp = email.utils.formatdate(origin.modified.get(self.path, 1_700_000_000), usegmt=True)
                if (origin.etag and self.headers.get("If-None-Match") == tag) or \
                        (origin.last_modified and not origin.etag and self.headers.get("If-Modified-Since") == stamp):
                    self.send_response(304)
                    self.end_headers()
                    return
                self.send_response(200)
                if origin.etag:
                    self.send_header("ETag", tag)
                if origin.last_modified:
                    self.send_header("Last-Modified", stamp)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        with (netns.inside() if netns is not None else contextlib.nullcontext()):
            self.server = http.server.ThreadingHTTPServer((address, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.ca = None
        if tls:
            self.ca, cert, key = make_ca(where, address)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.base = f"{scheme}://{address}:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def put(self, path: str, body: bytes | str) -> None:
        self.files[path] = body.encode() if isinstance(body, str) else body
        self.modified[path] = self.modified.get(path, 1_700_000_000) + 1

    def gets(self, path: str) -> list[tuple[float, str, str, dict]]:
        return [r for r in self.requests if r[2] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
