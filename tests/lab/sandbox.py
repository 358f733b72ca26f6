"""A sandbox of throw-away network namespaces: a "vm" and an "internet" joined by veth.

The lab, not the product: used by the root tests, the demo and the benchmarks, never installed. Everything lives on documentation
addresses (203.0.113.0/24, 2001:db8::/32) inside namespaces made here; ``Lab.close`` removes
them and every process in them. The host's own network is never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: the daemon runs from it
RAMFW = [sys.executable, "-m", "ramfw.cli"]
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_counter = iter(range(1_000_000))

VM4, NET4 = "203.0.113.1", "203.0.113.2"
VM6, NET6 = "2001:db8::1", "2001:db8::2"
ALLOWED4, BLOCKED4 = "203.0.113.10", "203.0.113.20"
ALLOWED6, BLOCKED6 = "2001:db8::10", "2001:db8::20"
CDN4 = "203.0.113.30"
BRIDGE4, CONTAINER4 = "198.51.100.1", "198.51.100.2"
BRIDGE6, CONTAINER6 = "2001:db8:1::1", "2001:db8:1::2"
ROGUE_DNS4 = "203.0.113.53"


def skip_reason() -> str | None:
    """Why the root tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root for network namespaces and nftables"
    for tool in ("ip", "nft", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run scripts/setup)"
    try:
        import nftables  # noqa: F401
    except ImportError:
        return "python3-nftables is not importable (run scripts/setup)"
    return None


def run(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, **kw)


class Netns:
    def __init__(self, role: str):
        self.name = f"ramfw-sbx-{os.getpid()}-{next(_counter)}-{role}"
        run("ip", "netns", "add", self.name)
        self.path = f"/var/run/netns/{self.name}"
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return run(*self.prefix(), *args, check=check, **kw)

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen([*self.prefix(), *args], **kw)

    def prefix(self) -> list[str]:
        """Enter only the network namespace (`ip netns exec` would remount /sys and hide cgroups)."""
        return ["nsenter", f"--net={self.path}"]

    @contextlib.contextmanager
    def inside(self):
        """Switch the calling thread into this namespace (sockets made here stay here)."""
        with open("/proc/thread-self/ns/net") as own, open(self.path) as target:
            if _libc.setns(target.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            try:
                yield
            finally:
                if _libc.setns(own.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back")

    def processes(self, word: bytes) -> list[int]:
        """Processes in this namespace whose command line holds ``word``."""
        found = []
        for pid in run("ip", "netns", "pids", self.name, check=False).stdout.split():
            try:
                if word in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                    found.append(int(pid))
            except OSError:
                continue
        return found

    def kill_all(self) -> None:
        pids = run("ip", "netns", "pids", self.name, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)

    def delete(self) -> None:
        self.kill_all()
        run("ip", "netns", "del", self.name, check=False)


class TcpServers:
    """Listening sockets inside a namespace; each connection is echoed in a thread of its own."""

    def __init__(self, ns: Netns, addresses: list[str], ports: list[int]):
        self.sockets = []
        self._stop = False
        with ns.inside():
            for address in addresses:
                for port in ports:
                    family = socket.AF_INET6 if ":" in address else socket.AF_INET
                    s = socket.socket(family, socket.SOCK_STREAM)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((address, port))
                    s.listen(512)
                    s.settimeout(0.2)
                    self.sockets.append(s)
        self.threads = [threading.Thread(target=self._serve, args=(s,), daemon=True) for s in self.sockets]
        for t in self.threads:
            t.start()

    def _serve(self, s: socket.socket) -> None:
        while not self._stop:
            try:
                conn, _ = s.accept()
            except (TimeoutError, socket.timeout, OSError):
                continue
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        for t in self.threads:
            t.join(timeout=2)
        for s in self.sockets:
            s.close()


class Lab:
    """vm <-veth-> internet, with test hosts on documentation addresses."""

    def __init__(self):
        self.namespaces: list[Netns] = []
        self.servers: list[TcpServers] = []
        self.processes: list[subprocess.Popen] = []
        self.cgroups: list[Path] = []
        try:
            self.vm = self._ns("vm")
            self.net = self._ns("net")
            veth_vm, veth_net = f"rfv{os.getpid() % 100000}{len(self.namespaces)}", f"rfn{os.getpid() % 100000}{len(self.namespaces)}"
            run("ip", "link", "add", veth_vm, "netns", self.vm.name, "type", "veth",
                "peer", "name", veth_net, "netns", self.net.name)
            self.vm.run("ip", "addr", "add", f"{VM4}/24", "dev", veth_vm)
            self.vm.run("ip", "addr", "add", f"{VM6}/64", "dev", veth_vm, "nodad")
            self.vm.run("ip", "link", "set", veth_vm, "up")
            for address in (NET4, ALLOWED4, BLOCKED4, CDN4, ROGUE_DNS4):
                self.net.run("ip", "addr", "add", f"{address}/24", "dev", veth_net)
            for address in (NET6, ALLOWED6, BLOCKED6):
                self.net.run("ip", "addr", "add", f"{address}/64", "dev", veth_net, "nodad")
            self.net.run("ip", "link", "set", veth_net, "up")
        except BaseException:
            self.close()
            raise

    def _ns(self, role: str) -> Netns:
        ns = Netns(role)
        self.namespaces.append(ns)
        return ns

    def add_container(self, bridge: str | None = None) -> Netns:
        """A "container" behind the vm, whose traffic the vm forwards: on a veth routed by the
        vm, or, with ``bridge``, on a bridge of that name holding the veth (as docker0 does)."""
        container = self._ns("ctr")
        inside, outside = f"rfc{os.getpid() % 100000}", f"rfb{os.getpid() % 100000}"
        run("ip", "link", "add", inside, "netns", container.name, "type", "veth", "peer", "name", outside,
            "netns", self.vm.name)
        container.run("ip", "addr", "add", f"{CONTAINER4}/24", "dev", inside)
        container.run("ip", "addr", "add", f"{CONTAINER6}/64", "dev", inside, "nodad")
        container.run("ip", "link", "set", inside, "up")
        container.run("ip", "route", "add", "default", "via", BRIDGE4)
        container.run("ip", "-6", "route", "add", "default", "via", BRIDGE6)
        if bridge is not None:
            self.vm.run("ip", "link", "add", bridge, "type", "bridge")
            self.vm.run("ip", "link", "set", outside, "master", bridge)
            self.vm.run("ip", "link", "set", bridge, "up")
        self.vm.run("ip", "addr", "add", f"{BRIDGE4}/24", "dev", bridge or outside)
        self.vm.run("ip", "addr", "add", f"{BRIDGE6}/64", "dev", bridge or outside, "nodad")
        self.vm.run("ip", "link", "set", outside, "up")
        self.vm.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        self.net.run("ip", "-6", "route", "add", "2001:db8:1::/64", "via", VM6)
        self.vm.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.net.run("ip", "route", "add", "198.51.100.0/24", "via", VM4)
        return container

    def serve_tcp(self, addresses: list[str], ports: list[int]) -> TcpServers:
        servers = TcpServers(self.net, addresses, ports)
        self.servers.append(servers)
        return servers

    def start_dnsmasq(self, address: str, *options: str, ttl: int = 300, port: int = 53) -> subprocess.Popen:
        """A real DNS server on a test host: dnsmasq answering from the records given."""
        proc = self.net.popen(
            "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
            f"--listen-address={address}", f"--port={port}", "--user=root", "--pid-file=",
            f"--local-ttl={ttl}", "--cache-size=0", *options,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.processes.append(proc)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited: {proc.stderr.read().decode()}")
            if f"{address}:{port} " in self.net.run("ss", "-ulnH").stdout + " ":
                return proc
            time.sleep(0.05)
        raise RuntimeError("dnsmasq did not start listening")

    def start_daemon(self, config: str, *args: str, wait: float = 20, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
        """`ramfw daemon` in the vm namespace; returns once its control socket answers."""
        from ramfw import config as config_mod
        from ramfw.daemon.control import answers

        # Its log goes to a file: a pipe nobody reads would stall the daemon once it filled.
        log = tempfile.TemporaryFile()
        cgroup = self.cgroup("daemon")  # a cgroup of its own, as systemd gives a service
        proc = self.vm.popen(*prefix, *RAMFW, "daemon", "--config", config, *args, cwd=str(ROOT),
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT,
                             preexec_fn=cgroup and (lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))))
        proc.log = log
        self.processes.append(proc)
        loaded = config_mod.load(config)
        deadline = time.monotonic() + wait
        while not answers(loaded):
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the daemon exited: {log.read().decode(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not answer within {wait} s")
            time.sleep(0.05)
        return proc

    def cgroup(self, role: str) -> Path | None:
        """A new cgroup v2 directory, removed by ``close`` (None where no cgroup v2 is mounted)."""
        from ramfw.kernel.bpf import cgroup2_mount

        mount = cgroup2_mount()
        if mount is None:
            return None
        path = Path(mount) / f"ramfw-sbx-{os.getpid()}-{len(self.cgroups)}-{role}"
        path.mkdir()
        self.cgroups.append(path)
        return path

    def resolve(self, name: str, rdtype: str = "A", server: str = NET4, tcp: bool = False,
                payload: int | None = None, port: int = 53, source: Netns | None = None):
        """Ask a DNS server from the vm (the reply crosses the vm's netfilter hooks)."""
        import dns.message
        import dns.query

        query = dns.message.make_query(name, rdtype, use_edns=payload is not None,
                                       payload=payload or 512)
        with (source or self.vm).inside():
            family = socket.AF_INET6 if ":" in server else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
        with sock:  # dnspython waits on a given socket only if it is non-blocking
            if tcp:
                sock.settimeout(3)
                sock.connect((server, port))
                sock.setblocking(False)
                return dns.query.tcp(query, server, timeout=3, port=port, sock=sock)
            sock.setblocking(False)
            return dns.query.udp(query, server, timeout=3, port=port, sock=sock)

    def ramfw(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        """Run the ramfw CLI inside the vm namespace, as a separate process."""
        return self.vm.run(*RAMFW, *args, check=check, cwd=str(ROOT),
                           env={**os.environ, "PYTHONPATH": str(ROOT)})

    def connect(self, address: str, port: int = 443, mark: int | None = None,
                timeout: float = 3.0, source: Netns | None = None) -> tuple[str, float]:
        """Open a TCP connection from the vm (or ``source``); return (outcome, seconds)."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with (source or self.vm).inside():
            s = socket.socket(family, socket.SOCK_STREAM)
        try:
            if mark is not None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            s.settimeout(timeout)
            start = time.perf_counter()
            try:
                s.connect((address, port))
                outcome = "connected"
            except ConnectionRefusedError:
                outcome = "refused"
            except (TimeoutError, socket.timeout):
                outcome = "timeout"
            except OSError as err:
                outcome = f"error {err.errno}"
            return outcome, time.perf_counter() - start
        finally:
            s.close()

    def close(self) -> None:
        for proc in self.processes:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.wait(timeout=5)
        for servers in self.servers:
            with contextlib.suppress(Exception):
                servers.close()
        for ns in reversed(self.namespaces):
            ns.delete()
        for cgroup in self.cgroups:
            remove_cgroup(cgroup)


def remove_cgroup(path: Path) -> None:
    """Kill what is left in a test's cgroup, then remove it (a cgroup with a process cannot be)."""
    for _ in range(50):
        try:
            pids = (path / "cgroup.procs").read_text().split()
        except OSError:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        with contextlib.suppress(OSError):
            path.rmdir()
            return
        time.sleep(0.1)
