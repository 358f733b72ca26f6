"""The prober against a small registry on loopback (no root needed): a Bearer challenge whose
token endpoint is another host, an index, a manifest, a blob that redirects to a CDN with a
signed URL; TLS trusted through a certs.d directory, as the engine's is."""

import base64
import http.server
import json
import shutil
import ssl
import subprocess
import threading
import time

import pytest

from ramfw.check import probe
from ramfw.check.credentials import Login

NAMES = ("registry.test", "auth.test", "cdn.test")


class Resolver:
    """Every test name is 127.0.0.1."""

    def addresses(self, host, deadline=None):
        if host not in NAMES:
            raise probe.Failed(f"{host} has no address")
        return ("127.0.0.1",)


class World:
    def __init__(self, tmp_path):
        self.seen: list[tuple[str, str, str]] = []  # (server, path, Authorization)
        self.dir = tmp_path
        self._certificates()
        self.servers = {}
        for name in NAMES:
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler(name))
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
            server.socket = context.wrap_socket(server.socket, server_side=True)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.servers[name] = server

    def port(self, name):
        return self.servers[name].server_address[1]

    def _certificates(self):
        d = self.dir
        (d / "san.cnf").write_text("subjectAltName = " + ",".join(f"DNS:{n}" for n in NAMES) + "\n")
        key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for step in (["req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
                      "-subj", "/CN=check test CA"],
                     ["req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=registry.test"],
                     ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                      "-out", "server.crt", "-days", "1", "-extfile", "san.cnf"]):
            subprocess.run(["openssl", *step], cwd=d, check=True, capture_output=True)

    def _handler(self, name):
        world = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, status, body=b"", **headers):
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key.replace("_", "-"), value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                world.seen.append((name, self.path, self.headers.get("Authorization", "")))
                if name == "auth.test":
                    return self.answer(200, json.dumps({"token": "T0KEN"}).encode())
                if name == "cdn.test":
                    return self.answer(200, b"{}")
                if self.headers.get("Authorization") != "Bearer T0KEN":
                    realm = f"https://auth.test:{world.port('auth.test')}/token"
                    return self.answer(401, WWW_Authenticate=f'Bearer realm="{realm}",service="registry.test"')
                if self.path == "/v2/slow/image/manifests/1":  # a byte every 0.3 s
                    self.send_response(200)
                    self.send_header("Content-Length", "20")
                    self.end_headers()
                    for _ in range(20):
                        try:
                            self.wfile.write(b" ")
                            self.wfile.flush()
                        except OSError:
                            return
                        time.sleep(0.3)
                    return
                if self.path == "/v2/test/image/manifests/1":
                    index = {"manifests": [
                        {"digest": f"sha256:{arch}", "platform": {"os": "linux", "architecture": arch}}
                        for arch in ("arm64", "amd64", "s390x", "ppc64le", "arm", "386", "riscv64")]}
                    return self.answer(200, json.dumps(index).encode(),
                                       Content_Type="application/vnd.oci.image.index.v1+json")
                if self.path.startswith("/v2/test/image/manifests/sha256:"):
                    manifest = {"schemaVersion": 2, "config": {"digest": "sha256:cfg"}, "layers": []}
                    return self.answer(200, json.dumps(manifest).encode(),
                                       Content_Type="application/vnd.oci.image.manifest.v1+json")
                if self.path == "/v2/test/image/blobs/sha256:cfg":
                    target = f"https://cdn.test:{world.port('cdn.test')}/blob/cfg?X-Amz-Signature=s3cr3t"
                    return self.answer(307, Location=target)
                return self.answer(404)

        return Handler

    def close(self):
        for server in self.servers.values():
            server.shutdown()
            server.server_close()


@pytest.fixture
def world(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    the_world = World(tmp_path)
    try:
        yield the_world
    finally:
        the_world.close()


def certs_for(world, registry):
    certs = world.dir / "certs.d"
    (certs / registry).mkdir(parents=True)
    shutil.copy(world.dir / "ca.crt", certs / registry / "ca.crt")
    return str(certs)


def test_a_pull_is_followed_to_its_cdn_and_every_host_is_written_down(world):
    registry = f"registry.test:{world.port('registry.test')}"
    login = Login(base64.b64encode(b"u:p").decode(), "the login for it")
    result = probe.probe(f"{registry}/test/image:1", login, [], certs_for(world, registry), resolver=Resolver())
    assert result["complete"], result["error"]
    hops = [(s["role"], s["host"], s["status"]) for s in result["steps"]]
    assert hops == [("registry", "registry.test", 401), ("token", "auth.test", 200),
                    ("registry", "registry.test", 200), ("registry", "registry.test", 200),
                    ("blob", "registry.test", 307), ("redirect", "cdn.test", 200)]
    assert result["steps"][4]["location"] == f"https://cdn.test:{world.port('cdn.test')}/blob/cfg"
    assert "s3cr3t" not in json.dumps(result) and "T0KEN" not in json.dumps(result) and "dTpw" not in json.dumps(result)
    assert f"{registry}/ca.crt" in result["trust"]
    auth = {server: header for server, _, header in world.seen}
    assert auth["auth.test"] == "Basic dTpw", "the login goes to the token endpoint"
    assert auth["cdn.test"] == "", "no credential follows a redirect to another host"
    token_path = next(path for server, path, _ in world.seen if server == "auth.test")
    assert "scope=repository%3Atest%2Fimage%3Apull" in token_path and "service=registry.test" in token_path


def test_without_the_engines_ca_the_probe_stops_at_tls(world, tmp_path):
    registry = f"registry.test:{world.port('registry.test')}"
    result = probe.probe(f"{registry}/test/image:1", Login(), [], str(tmp_path / "none"), resolver=Resolver())
    assert not result["complete"] and "certificate is not trusted" in result["error"]
    assert result["steps"][0]["host"] == "registry.test" and result["steps"][0]["address"] == "127.0.0.1"


def test_a_missing_image_and_an_unknown_name_stop_the_probe(world):
    registry = f"registry.test:{world.port('registry.test')}"
    certs = certs_for(world, registry)
    missing = probe.probe(f"{registry}/test/other:1", Login(), [], certs, resolver=Resolver())
    assert not missing["complete"] and "answered 404 for the manifest" in missing["error"]
    unknown = probe.probe("nowhere.test/test/image:1", Login(), [], certs, resolver=Resolver())
    assert not unknown["complete"] and "no address" in unknown["error"]
    assert unknown["steps"][0]["host"] == "nowhere.test"


def test_a_server_that_trickles_cannot_hold_the_probe_past_its_budget(world):
    registry = f"registry.test:{world.port('registry.test')}"
    start = time.monotonic()
    result = probe.probe(f"{registry}/slow/image:1", Login(), [], certs_for(world, registry), budget=1.5,
                         resolver=Resolver())
    assert not result["complete"] and "timed out" in result["error"]
    assert time.monotonic() - start < 3
