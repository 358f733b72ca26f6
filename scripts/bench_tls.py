"""Benchmarks of the TLS server name check (issue #13), run by scripts/bench.py.

- ``tls_ttfb``: time to the first byte of a new TLS connection (SYN to the server's first
  record, the ClientHello sent by a client of the bench's own), to a port the daemon checks
  (443) and to one it does not (8443: the address check alone), alternated connection by
  connection with one daemon, so both see the same machine; the packets that reached the
  daemon per connection; the daemon's CPU per 1,000 new connections, each port on its own.
- ``tls_pull``: a docker pull through the allowed name, with the check on and off (two
  daemons, alternated), after a warm-up of each.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import time
from pathlib import Path

from tests.lab.edge import EDGE4, Authority, Edge, add_addresses
from tests.lab.sandbox import NET4
from tests.support.tls import client_hello

MARK = 0x52410000
NAME = "edge-allowed.test"


def _pct(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def _config(tmp: str, *, check: bool = True, extra: str = "", registry: str = NAME) -> str:
    policy = Path(tmp, "policy.json")
    policy.write_text(json.dumps({"organizations": [{"name": "bench", "registryAccess": {
        "registries": [{"address": registry}]}}]}))
    path = Path(tmp, f"ramfw-{'on' if check else 'off'}.toml")
    path.write_text(f'[policy]\nsource = "{policy}"\ncache = "{tmp}/c.json"\n'
                    f'[dns]\ntrusted_resolvers = ["{NET4}"]\n[daemon]\nrun_dir = "{tmp}/run"\n'
                    f'[enforcement]\ntls_check = {str(check).lower()}\n{extra}')
    return str(path)


def _cpu(pid: int) -> tuple[float, float]:
    """The process's user and system CPU seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def _first_byte(lab, port: int, hello: bytes) -> float:
    with lab.vm.inside():
        sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
    sock.settimeout(3)
    try:
        start = time.perf_counter()
        sock.connect((EDGE4, port))
        sock.sendall(hello)
        if sock.recv(1) != b"\x16":
            raise RuntimeError(f"port {port}: no TLS record came back")
        return (time.perf_counter() - start) * 1e6
    finally:
        sock.close()


def _big(hello: bytes) -> bytes:
    """The ClientHello made as long as Go 1.24's with its post-quantum key share (~1.6 KB here): its
    padding extension (21) lengthened; over the lab's MTU it leaves in two segments."""
    from tests.support import tls

    return tls.edit(hello, lambda extensions: [(k, bytes(1300) if k == 21 else d) for k, d in extensions])


def _timed(lab, hello: bytes, count: int) -> tuple[list[float], list[float]]:
    checked, plain = [], []
    for _ in range(count):
        checked.append(_first_byte(lab, 443, hello))
        plain.append(_first_byte(lab, 8443, hello))
    return checked, plain


def _figures(checked: list[float], plain: list[float]) -> dict:
    added = [c - p for c, p in zip(checked, plain, strict=True)]
    return {"checked_p50_us": round(_pct(checked, 50)), "checked_p99_us": round(_pct(checked, 99)),
            "address_only_p50_us": round(_pct(plain, 50)), "address_only_p99_us": round(_pct(plain, 99)),
            "added_p50_us": round(_pct(checked, 50) - _pct(plain, 50)),
            "added_p99_us": round(_pct(checked, 99) - _pct(plain, 99)),
            "paired_added_median_us": round(statistics.median(added))}


def tls_ttfb(lab, tmp, count: int = 3000, cpu_connections: int = 1000) -> dict:
    add_addresses(lab, (EDGE4,))
    authority = Authority(Path(tmp, "edge"))
    for port in (443, 8443):
        lab.servers.append(Edge(lab.net, authority, [NAME], addresses=(EDGE4,), port=port))
    lab.start_dnsmasq(NET4, f"--host-record={NAME},{EDGE4}")
    config = _config(tmp)
    daemon = lab.start_daemon(config)
    lab.resolve(NAME)
    hello = client_hello(NAME)
    results = {"connections_each": count}
    for label, record in (("one_segment", hello), ("two_segments", _big(hello))):
        _timed(lab, record, 50)  # warm-up
        before = _status(lab, config)["tls"]["counters"]
        figures = _figures(*_timed(lab, record, count))
        after = _status(lab, config)["tls"]
        flows = after["counters"]["allowed"] - before.get("allowed", 0)
        segments = after["counters"]["segments"] - before.get("segments", 0)
        results[label] = {"hello_bytes": len(record), **figures,
                          "packets_to_daemon_per_connection": round(segments / flows, 3) if flows else None,
                          # in the daemon, from reading the segment to its verdict's return (which
                          # carries the segment on through the rest of the path, to the server)
                          "daemon_read_to_verdict_p50_us": after["verdict_us_p50"]}
    pid, cpu = daemon.pid, {}
    for port in (443, 8443):
        user, system = _cpu(pid)
        for _ in range(cpu_connections):
            _first_byte(lab, port, hello)
        cpu[port] = tuple(round((b - a) * 1e6 / cpu_connections) for a, b in zip((user, system), _cpu(pid)))
    # user and system CPU: the system part includes sending each released segment on (its
    # verdict's system call carries it through the rest of the path)
    results["daemon_cpu_ms_per_1000_connections"] = {"checked_user_system": cpu[443],
                                                     "address_only_user_system": cpu[8443]}
    return results


def _status(lab, config: str) -> dict:
    return json.loads(lab.ramfw("status", "--json", "--config", config).stdout)


def tls_pull(lab, tmp, rounds: int = 10) -> dict:
    """docker pull of a 5-layer image (5 x 8 MB) through the shared edge's allowed name, the
    check on and off, alternated."""
    from tests.lab.registry import EDGE_ALLOWED, IMAGE, RegistryLab

    registries = RegistryLab(lab, Path(tmp) / "registries", layers=5, layer_bytes=8 << 20, shared_edge=True)
    configs = {mode: _config(tmp, check=mode == "on", extra=f'bpffs = "{tmp}/bpffs"\n', registry=EDGE_ALLOWED)
               for mode in ("on", "off")}
    times = {"on": [], "off": []}
    try:
        registries.start_engine()
        for round_ in range(rounds + 1):
            for mode, config in configs.items():
                ids = registries.docker("images", "-q").stdout.split()
                if ids:
                    registries.docker("rmi", "-f", *set(ids))
                proc = lab.start_daemon(config)
                time.sleep(1)
                start = time.perf_counter()
                registries.docker("pull", f"{EDGE_ALLOWED}/{IMAGE}")
                if round_:
                    times[mode].append(time.perf_counter() - start)
                proc.terminate()
                proc.wait(10)
    finally:
        registries.close()
        subprocess.run(["umount", f"{tmp}/bpffs"], capture_output=True)
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    return {"image": "5 layers x 8 MB", "rounds": rounds, "median_on_s": round(on, 3), "median_off_s": round(off, 3),
            "ratio": round(on / off, 3),
            "paired_ratio_median": round(statistics.median(a / b for a, b in zip(times["on"], times["off"],
                                                                                 strict=True)), 3),
            "on_s": [round(t, 3) for t in times["on"]], "off_s": [round(t, 3) for t in times["off"]]}
