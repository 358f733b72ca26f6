"""Real registries and a real Docker engine inside the sandbox (for the end-to-end tests,
the demo and the docker pull benchmark).

"The internet" namespace runs Debian's docker-registry behind small TLS fronts, one per test
host, with certificates from a throw-away CA:

    allowed-registry.test, blocked-registry.test  203.0.113.10 / .20   plain registries
    redirect-registry.test                        203.0.113.40         blob GETs answer 307 to
    blobs.redirect-cdn.test                       203.0.113.30         ... this CDN host
    /files/<name> on every host                                        for Dockerfile ADD <url>

"The VM" runs containerd and dockerd as a stock systemd install does, each in a cgroup of its
own (containerd.service, docker.service), dockerd in a private mount namespace that sees the test CA, a resolv.conf pointing at the test DNS server and its own
/etc/hosts. Nothing is installed on, or left behind on, the host.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import http.server
import io
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tarfile
import threading
import time
import urllib.parse
from pathlib import Path

from .sandbox import ALLOWED4, BLOCKED4, CDN4, NET4, Lab, remove_cgroup

REDIRECT4 = "203.0.113.40"
DOCKER0, POOL = "192.0.2.1/25", "192.0.2.128/25"  # the engine's bridge and its user-defined networks
HOSTS = {
    "allowed-registry.test": ALLOWED4,
    "blocked-registry.test": BLOCKED4,
    "redirect-registry.test": REDIRECT4,
    "blobs.redirect-cdn.test": CDN4,
}
HOSTS_FILE_ONLY = "hosts-file-registry.test"  # reachable only through /etc/hosts (-> blocked)
IMAGE = "test/image:1"
EDGE4 = "203.0.113.50"  # the shared edge (tests.lab.edge): both names below, one address
EDGE_ALLOWED, EDGE_OTHER = "edge-allowed.test", "edge-other.test"
EDGE_HOSTS = {EDGE_ALLOWED: 5000, EDGE_OTHER: 5001}  # name -> the registry behind it (net namespace)
_BLOB = re.compile(r"/v2/.+/blobs/sha256:[0-9a-f]{64}")


def tools_missing() -> str | None:
    for tool in ("dockerd", "docker", "docker-registry", "skopeo", "openssl", "containerd", "runc", "busybox"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup installs docker.io, docker-registry, skopeo, busybox-static)"
    return None


class _Front(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, lab: Lab, address: str, redirect_to: str | None):
        self.lab, self.redirect_to = lab, redirect_to
        with lab.net.inside():
            super().__init__((address, 443), _FrontHandler)


class _FrontHandler(http.server.BaseHTTPRequestHandler):
    """Proxies to the registry; answers /files/ itself; redirects blob GETs when told to."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, headers: dict, body: bytes, length: str | None = None) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", length if length is not None else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        body = self._body()
        if self.path.startswith("/files/"):
            return self._reply(200, {"Content-Type": "text/plain"}, f"hello from {self.headers['Host']}\n".encode())
        if self.path.startswith("/dockerfile?"):  # a build's remote context: the Dockerfile in the query
            text = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)["text"][0]
            return self._reply(200, {"Content-Type": "text/plain"}, text.encode())
        if self.server.redirect_to and self.command == "GET" and _BLOB.fullmatch(self.path.split("?")[0]):
            return self._reply(307, {"Location": f"https://{self.server.redirect_to}{self.path}"}, b"")
        port = getattr(self.server, "upstreams", {}).get(getattr(self.request, "requested_name", ""), 5000)
        with self.server.lab.net.inside():
            upstream = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            upstream.connect()
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for key, value in self.headers.items():  # repeated headers (Accept) stay repeated
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    upstream.putheader(key, value)
            upstream.putheader("X-Forwarded-Proto", "https")
            upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body)
            response = upstream.getresponse()
            data = response.read()
            passed = {k: v for k, v in response.getheaders()
                      if k.lower() not in ("content-length", "transfer-encoding", "connection")}
            length = response.getheader("Content-Length") if self.command == "HEAD" else None
            self._reply(response.status, passed, data, length)
        finally:
            upstream.close()

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


class RegistryLab:
    """Registries, DNS and dockerd for end-to-end runs; ``close`` undoes everything."""

    def __init__(self, lab: Lab, workdir: Path, layers: int = 3, layer_bytes: int = 256 * 1024,
                 shared_edge: bool = False):
        self.lab, self.dir = lab, Path(workdir)
        self.fronts: list[_Front] = []
        self.dockerd: subprocess.Popen | None = None
        self.proxy = ""  # an HTTPS proxy dockerd is started with ("http://address:port"), none by default
        self.cgroup: Path | None = None
        self.dir.mkdir(parents=True, exist_ok=True)
        lab.net.run("ip", "addr", "add", f"{REDIRECT4}/24", "dev", self._net_if())
        self._certificates()
        self._registry()
        for name, address in HOSTS.items():
            self._front(address, "blobs.redirect-cdn.test" if name == "redirect-registry.test" else None)
        names = [f"--host-record={n},{a}" for n, a in HOSTS.items()]
        if shared_edge:  # issue #13: two registries behind one TLS edge address
            names += [f"--host-record={n},{EDGE4}" for n in EDGE_HOSTS]
            self._registry(EDGE_HOSTS[EDGE_OTHER], "registry-other")
        lab.start_dnsmasq(NET4, *names)
        self._push_image(layers, layer_bytes)
        if shared_edge:
            self._push_image(layers, layer_bytes, EDGE_HOSTS[EDGE_OTHER])
            self._shared_edge()

    def _net_if(self) -> str:
        out = self.lab.net.run("ip", "-o", "link", "show", "type", "veth").stdout
        return out.split(":")[1].strip().split("@")[0]

    # -- the internet --------------------------------------------------------------------
    def _certificates(self) -> None:
        d = self.dir
        sans = ",".join([f"DNS:{n}" for n in [*HOSTS, HOSTS_FILE_ONLY]] + [f"IP:{BLOCKED4}"])
        (d / "san.cnf").write_text(f"subjectAltName = {sans}\n")
        steps = [
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=ramfw sandbox CA"],
            ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=registry.test"],
            ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "2", "-extfile", "san.cnf"],
        ]
        for step in steps:
            subprocess.run(["openssl", *step], cwd=d, check=True, capture_output=True)
        self.ca = d / "ca.crt"

    def _registry(self, port: int = 5000, name: str = "registry") -> None:
        (self.dir / name).mkdir(exist_ok=True)
        config = self.dir / f"{name}.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {self.dir / name}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{port}\n")
        proc = self.lab.net.popen("docker-registry", "serve", str(config),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.lab.processes.append(proc)
        _wait(lambda: f"127.0.0.1:{port} " in self.lab.net.run("ss", "-tlnH").stdout + " ", "docker-registry")

    def _shared_edge(self) -> None:
        """One address (EDGE4), two names, two certificates chosen by the ClientHello's server
        name, each in front of its own docker-registry: a CDN edge serving two tenants."""
        from .edge import Authority, contexts

        link = self._net_if()
        self.lab.net.run("ip", "addr", "add", f"{EDGE4}/24", "dev", link)
        authority = Authority.signed_by(self.dir / "ca.crt", self.dir / "ca.key", self.dir / "edge")
        server = _Front(self.lab, EDGE4, None)
        server.upstreams = EDGE_HOSTS
        # the handshake in the request's thread: a refused ClientHello never reaches the edge, whose
        # handshake would otherwise hold the accepting thread
        server.socket = contexts(authority, list(EDGE_HOSTS)).wrap_socket(server.socket, server_side=True,
                                                                          do_handshake_on_connect=False)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.fronts.append(server)

    def _front(self, address: str, redirect_to: str | None) -> None:
        server = _Front(self.lab, address, redirect_to)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.dir / "server.crt", self.dir / "server.key")
        server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.fronts.append(server)

    def _push_image(self, layers: int, layer_bytes: int, port: int = 5000) -> None:
        """Build an OCI image by hand (no engine needed) and push it with skopeo."""
        layout = self.dir / f"oci-{port}"
        blobs = layout / "blobs" / "sha256"
        blobs.mkdir(parents=True, exist_ok=True)

        def blob(data: bytes) -> dict:
            digest = hashlib.sha256(data).hexdigest()
            (blobs / digest).write_bytes(data)
            return {"digest": f"sha256:{digest}", "size": len(data)}

        diff_ids, layer_descriptors = [], []
        for index in range(layers):
            raw = io.BytesIO()
            with tarfile.open(fileobj=raw, mode="w") as tar:
                content = os.urandom(layer_bytes)
                info = tarfile.TarInfo(f"layer{index}.bin")
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            diff_ids.append("sha256:" + hashlib.sha256(raw.getvalue()).hexdigest())
            layer_descriptors.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                      **blob(gzip.compress(raw.getvalue(), mtime=0))})
        config = blob(json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                                  "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode())
        manifest = blob(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                                    "layers": layer_descriptors}).encode())
        (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
             "annotations": {"org.opencontainers.image.ref.name": "1"}}]}))
        self.lab.net.run("skopeo", "copy", "--quiet", "--format", "v2s2", "--dest-tls-verify=false", f"oci:{layout}:1",
                         f"docker://127.0.0.1:{port}/{IMAGE}")

    # -- the VM: containerd and dockerd, two services in two cgroups ------------------------
    def start_engine(self) -> tuple[Path, Path]:
        """containerd and dockerd as a stock systemd install runs them: two processes, each in
        a cgroup of its own (containerd.service, docker.service), dockerd told where containerd
        listens. Returns (dockerd's cgroup, containerd's cgroup)."""
        root = self.dir / "vm"
        root.mkdir(parents=True, exist_ok=True)
        self.containerd_cgroup = self.lab.cgroup("containerd.service")
        (root / "containerd.toml").write_text("version = 2\n")
        self.containerd_socket = root / "containerd.sock"
        self.containerd = self.lab.vm.popen(
            "containerd", "--config", str(root / "containerd.toml"), "--root", str(root / "containerd"),
            "--state", str(root / "containerd-state"), "--address", str(self.containerd_socket),
            "--log-level", "error", stdout=subprocess.DEVNULL, stderr=open(root / "containerd.log", "wb"),
            preexec_fn=_enter(self.containerd_cgroup))
        self.lab.processes.append(self.containerd)
        _wait(lambda: self.containerd_socket.exists() or self.containerd.poll() is not None, "containerd")
        self.cgroup = self.lab.cgroup("docker.service")
        self.start_dockerd()
        return self.cgroup, self.containerd_cgroup

    def start_dockerd(self) -> None:
        """dockerd in docker.service's cgroup, in a private mount namespace that sees the lab's
        CA, resolv.conf and hosts; returns once it answers."""
        root = self.dir / "vm"
        etc_docker = root / "etc-docker"
        for host in [*HOSTS, HOSTS_FILE_ONLY, BLOCKED4]:
            (etc_docker / "certs.d" / host).mkdir(parents=True, exist_ok=True)
            shutil.copy(self.ca, etc_docker / "certs.d" / host / "ca.crt")
        (root / "resolv.conf").write_text(f"nameserver {NET4}\n")
        (root / "hosts").write_text(f"127.0.0.1 localhost\n{BLOCKED4} {HOSTS_FILE_ONLY}\n")
        system_cas = Path("/etc/ssl/certs/ca-certificates.crt")
        bundle = root / "ca-certificates.crt"
        bundle.write_text((system_cas.read_text() if system_cas.exists() else "") + self.ca.read_text())
        self.socket = root / "docker.sock"
        mounts = [(root / "resolv.conf", "/etc/resolv.conf"), (root / "hosts", "/etc/hosts"),
                  (etc_docker, "/etc/docker")]
        if system_cas.exists():
            mounts.append((bundle, str(system_cas)))
        if not Path("/etc/docker").is_dir():
            raise RuntimeError("/etc/docker is missing: reinstall docker.io")
        script = "; ".join(f"mount --bind {src} {dst}" for src, dst in mounts)
        script += f"; export HTTPS_PROXY={self.proxy}" if self.proxy else ""
        script += (f"; exec nsenter --net={self.lab.vm.path} dockerd --data-root {root}/data "
                   f"--exec-root {root}/exec --pidfile {root}/docker.pid -H unix://{self.socket} "
                   f"--containerd {self.containerd_socket} --storage-driver=vfs --log-level=error "
                   # a stock engine: its default bridge, iptables (here iptables-nft) and the userland
                   # proxy, on documentation addresses; all of it inside the vm's namespace
                   f"--bip {DOCKER0} --default-address-pool base={POOL},size=28")
        self.dockerd = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                        preexec_fn=_enter(self.cgroup), stdout=subprocess.DEVNULL,
                                        stderr=open(root / "dockerd.log", "ab"))
        _wait(lambda: self.docker("version", check=False).returncode == 0 or self.dockerd.poll() is not None,
              "dockerd", timeout=60)
        if self.dockerd.poll() is not None:
            raise RuntimeError(f"dockerd exited: {(root / 'dockerd.log').read_text()[-2000:]}")

    def host_network(self) -> None:
        """Let the engine run containers with ``--net host`` (the vm's namespace). dockerd names
        that namespace by a file it bind-mounts under its exec root, in its private mount
        namespace, where runc (started by containerd, outside it) cannot see the mount: runc
        would join an empty file and fail. The same binding, made here too, is what it sees;
        ``close`` removes it."""
        key = self.dir / "vm" / "exec" / "netns" / "default"
        key.parent.mkdir(parents=True, exist_ok=True)
        key.touch()
        subprocess.run(["mount", "--bind", self.lab.vm.path, str(key)], check=True)
        self.host_network_key = key

    def restart_dockerd(self) -> None:
        """`systemctl restart docker` as systemd does it: stop, remove the cgroup, make it again, start."""
        self.stop_dockerd()
        remove_cgroup(self.cgroup)
        self.cgroup.mkdir()
        self.start_dockerd()

    def stop_dockerd(self) -> None:
        if self.dockerd is not None and self.dockerd.poll() is None:
            self.dockerd.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.dockerd.wait(20)

    def docker(self, *args: str, check: bool = True, timeout: float = 120, input: bytes | None = None,
               **env) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "-H", f"unix://{self.socket}", *args], capture_output=True,
                              text=input is None, input=input, check=check, timeout=timeout, env={**os.environ, **env})

    def buildkit(self, dockerfile: str) -> str:
        """Build ``dockerfile`` with the engine's BuildKit, through the Engine API (Debian 12's CLI
        needs the buildx plugin for BuildKit, which Debian 12 does not package): the context is a
        URL on the allowed registry's host that serves the Dockerfile, which dockerd fetches
        itself. Returns the build's error, or "" when it succeeded."""
        context = "https://allowed-registry.test/dockerfile?" + urllib.parse.urlencode({"text": dockerfile})
        query = urllib.parse.urlencode({"version": "2", "remote": context, "nocache": "1"})
        conn = http.client.HTTPConnection("docker", timeout=120)
        conn.sock = socket.socket(socket.AF_UNIX)
        conn.sock.connect(str(self.socket))
        try:
            conn.request("POST", f"/v1.41/build?{query}", body=b"")
            stream = conn.getresponse().read().decode()
        finally:
            conn.close()
        errors = [json.loads(line).get("error") for line in stream.splitlines() if line.strip()]
        return next((e for e in errors if e), "")

    def import_images(self) -> None:
        """Runnable images made from the host's files (no registry needed): ``local/busybox``
        (Debian's busybox-static) and ``local/registry`` (Debian's docker-registry)."""
        applets = ("sh", "httpd", "wget", "nslookup", "mkdir", "echo", "sleep", "cat")
        self._import("local/busybox:1", {"bin/busybox": "/bin/busybox"}, {f"bin/{a}": "busybox" for a in applets},
                     'CMD ["/bin/sh"]')
        registry = shutil.which("docker-registry")
        files = {"usr/bin/docker-registry": registry}
        ldd = subprocess.run(["ldd", registry], capture_output=True, text=True, check=True).stdout
        for path in re.findall(r"(/\S+\.so[.\d]*)", ldd):
            files[path.lstrip("/")] = os.path.realpath(path)
        config = self.dir / "registry-container.yml"
        config.write_text("version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                          "    rootdirectory: /var/lib/registry\nhttp:\n  addr: :5000\n")
        files["etc/docker/registry/config.yml"] = str(config)
        self._import("local/registry:1", files, {},
                     'CMD ["/usr/bin/docker-registry", "serve", "/etc/docker/registry/config.yml"]')

    def _import(self, name: str, files: dict[str, str], links: dict[str, str], command: str) -> None:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for inside, outside in files.items():
                tar.add(outside, arcname=inside)
            for inside, target in links.items():
                info = tarfile.TarInfo(inside)
                info.type, info.linkname = tarfile.SYMTYPE, target
                tar.addfile(info)
        self.docker("import", "--change", command, "-", name, input=buffer.getvalue())

    def close(self) -> None:
        self.stop_dockerd()  # the lab kills containerd and removes both cgroups
        if getattr(self, "host_network_key", None) is not None:
            subprocess.run(["umount", str(self.host_network_key)], capture_output=True)
        for server in self.fronts:
            with contextlib.suppress(Exception):
                server.shutdown()
                server.server_close()
        shutil.rmtree(self.dir / "vm", ignore_errors=True)


def _enter(cgroup: Path):
    """A preexec_fn that puts the child in ``cgroup`` before it executes."""
    return lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))


def _wait(ready, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start within {timeout} s")
        time.sleep(0.1)
