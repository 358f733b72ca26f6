"""The flood and soak benchmarks (issue #10): the daemon under DNS load, in the lab.

The load is Debian's dnsperf in the vm, asking dnsmasq (well-formed replies) and
``scripts/dns_responder.py`` (malformed ones, and the soak's one-off addresses) in the internet
namespace, so every reply is solicited (a forged one is dropped by the kernel before the daemon
sees it, see tests/integration/test_forged_replies.py) and crosses the vm's hold rules. A probe
thread meanwhile looks up one-off allowlisted names, the way a pull would, and times them.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import dns.exception

from tests.lab.sandbox import BLOCKED4, NET4, ROGUE_DNS4
from ramfw.kernel.table import Table
from scripts.bench import pct

HERE = Path(__file__).resolve().parent
HAMMER = """
import socket, sys, time
start = time.monotonic()
end, count, rate = start + float(sys.argv[1]), 0, float(sys.argv[3])
while time.monotonic() < end:
    time.sleep(max(0.0, start + count / rate - time.monotonic()))
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x52410000)  # in scope, as the engine's traffic
    s.settimeout(0.5)
    try:
        s.connect((sys.argv[2], 443))
    except OSError:
        pass
    s.close()
    count += 1
print(count)
"""


def start_responder(lab, address: str, ttl: int) -> subprocess.Popen:
    proc = lab.net.popen(sys.executable, str(HERE / "dns_responder.py"), address, str(ttl), stdout=subprocess.PIPE)
    lab.processes.append(proc)
    proc.stdout.readline()
    return proc


def write_config(tmp: str, dns_settings: str = "", resolvers: tuple[str, ...] = (NET4,)) -> str:
    policy = Path(tmp, "policy.json")
    policy.write_text(json.dumps({"organizations": [{"name": "load", "registryAccess": {
        "registries": [{"address": "allowed-registry.test"}]}}]}))
    config = Path(tmp, "ramfw.toml")
    config.write_text(f'[policy]\nsource = "{policy}"\ncache = "{tmp}/c.json"\n'
                      f'[dns]\ntrusted_resolvers = {json.dumps(list(resolvers))}\n{dns_settings}\n[daemon]\nrun_dir = "{tmp}/run"\n')
    return str(config)


def dnsperf(lab, datafile: Path, qps: int, seconds: int, tcp: bool = False, server: str = NET4) -> subprocess.Popen:
    proc = lab.vm.popen("dnsperf", "-s", server, "-d", str(datafile), "-l", str(seconds), "-Q", str(qps),
                        "-c", "4" if tcp else "8", "-q", "500", "-t", "2", *(["-m", "tcp"] if tcp else []),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lab.processes.append(proc)
    return proc


def dnsperf_figures(output: str) -> dict:
    found = {}
    for key, pattern in (("sent", r"Queries sent:\s+(\d+)"), ("completed", r"Queries completed:\s+(\d+)"),
                         ("lost", r"Queries lost:\s+(\d+)"), ("qps", r"Queries per second:\s+([\d.]+)"),
                         ("avg_latency_ms", r"Average Latency \(s\):\s+([\d.]+)")):
        match = re.search(pattern, output)
        if match:
            found[key] = float(match.group(1)) * (1000 if key == "avg_latency_ms" else 1)
    if "sent" not in found:
        return {"unreadable_output": output[-600:]}
    return {k: round(v, 2) if isinstance(v, float) and not v.is_integer() else int(v) for k, v in found.items()}


class Probe(threading.Thread):
    """Looks up a new allowlisted name every ``interval`` and times it (ms); a lookup that gets
    no answer within 3 s is a failure."""

    def __init__(self, lab, prefix: str, interval: float = 0.05):
        super().__init__(daemon=True)
        self.lab, self.prefix, self.interval = lab, prefix, interval
        self.samples: list[tuple[float, float | None]] = []  # (when, ms or None)
        self.stop = threading.Event()

    def run(self):
        n = 0
        while not self.stop.is_set():
            n += 1
            start = time.perf_counter()
            try:
                self.lab.resolve(f"{self.prefix}{n}.allowed-registry.test")
                self.samples.append((time.monotonic(), (time.perf_counter() - start) * 1000))
            except (dns.exception.DNSException, OSError):
                self.samples.append((time.monotonic(), None))
            self.stop.wait(self.interval)

    def figures(self, since: float = 0.0, until: float = float("inf")) -> dict:
        chosen = [ms for when, ms in self.samples if since <= when < until]
        ok = [ms for ms in chosen if ms is not None]
        return {"lookups": len(chosen), "failed": len(chosen) - len(ok), "p50_ms": round(pct(ok, 50) or 0, 2),
                "p99_ms": round(pct(ok, 99) or 0, 2), "max_ms": round(max(ok, default=0), 2)}


class Sampler(threading.Thread):
    """The daemon's RSS (KiB) and CPU seconds, every ``interval``."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int, float]] = []  # (when, rss KiB, cpu s)
        self.stop = threading.Event()

    def read(self) -> tuple[float, int, float]:
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS"))
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return time.monotonic(), rss, (int(fields[11]) + int(fields[12])) / 100

    def run(self):
        while not self.stop.is_set():
            self.samples.append(self.read())
            self.stop.wait(self.interval)


def slope_kib_per_min(samples) -> float:
    xs = [(when - samples[0][0]) / 60 for when, _, _ in samples]
    ys = [rss for _, rss, _ in samples]
    return round(statistics.linear_regression(xs, ys).slope, 1)


def udp_drops(ns) -> int:
    """Datagrams a namespace's sockets dropped for a full receive buffer (a starved reader)."""
    lines = [line.split() for line in ns.run("cat", "/proc/net/snmp").stdout.splitlines() if line.startswith("Udp:")]
    return int(lines[1][lines[0].index("RcvbufErrors")])


def daemon_pid(lab) -> int:
    return lab.vm.processes(b"daemon")[0]


def status(lab, config: str) -> dict:
    return json.loads(lab.ramfw("status", "--json", "--config", config).stdout)


def flood(lab, tmp, qps: int = 20_000, seconds: int = 60, tcp_qps: int = 1_000, bad_qps: int = 2_000,
          hammer_rate: int = 1_000) -> dict:
    """``qps`` replies a second offered for ``seconds``: allowlisted names (a thousand, asked again
    and again) and other names from dnsmasq, ``tcp_qps`` of them over TCP, ``bad_qps`` malformed
    replies (for both kinds of names) from the responder, while a client retries a blocked
    address ``hammer_rate`` times a second and the probe looks up new allowlisted names. The
    same flood runs first without ramfw: what the two cores give the load generators alone."""
    lab.start_dnsmasq(NET4, "--address=/allowed-registry.test/198.51.100.7",
                      "--address=/allowed-registry.test/2001:db8:ffff::7", "--address=/other-name.test/192.0.2.7",
                      "--address=/other-name.test/2001:db8:eeee::7")
    start_responder(lab, ROGUE_DNS4, ttl=300)
    good, bad = Path(tmp, "flood.txt"), Path(tmp, "bad.txt")
    good.write_text("".join(f"h{i % 1000}.allowed-registry.test {'AAAA' if i % 3 == 0 else 'A'}\n" if i % 2 else
                            f"h{i}.other-name.test {'AAAA' if i % 3 == 0 else 'A'}\n" for i in range(20_000)))
    bad.write_text("".join(f"bad-{i}.{'allowed-registry' if i % 2 else 'other-name'}.test A\n" for i in range(20_000)))
    rates = {"udp": (good, qps - tcp_qps - bad_qps, False, NET4), "tcp": (good, tcp_qps, True, NET4),
             "malformed_udp": (bad, bad_qps, False, ROGUE_DNS4)}

    def run(sampler: Sampler | None) -> dict:
        drops = {"vm": udp_drops(lab.vm), "internet": udp_drops(lab.net)}
        probe = Probe(lab, f"p{time.monotonic_ns()}-")
        for thread in (sampler, probe):
            if thread is not None:
                thread.start()
        time.sleep(5)  # the probe's baseline
        flood_start = time.monotonic()
        loads = {kind: dnsperf(lab, data, rate, seconds, tcp=tcp, server=server)
                 for kind, (data, rate, tcp, server) in rates.items()}
        hammer = lab.vm.popen(sys.executable, "-c", HAMMER, str(seconds), BLOCKED4, str(hammer_rate),
                              stdout=subprocess.PIPE, text=True)
        lab.processes.append(hammer)
        figures = {kind: dnsperf_figures(proc.communicate(timeout=seconds + 30)[0]) for kind, proc in loads.items()}
        flood_end = time.monotonic()
        hammer.communicate(timeout=10)
        time.sleep(5)  # recovery
        for thread in (sampler, probe):
            if thread is not None:
                thread.stop.set()
                thread.join()
        return {"achieved_qps": round(sum(f.get("qps", 0) for f in figures.values())), "dnsperf": figures,
                "udp_receive_buffer_drops": {"vm": udp_drops(lab.vm) - drops["vm"],
                                             "internet": udp_drops(lab.net) - drops["internet"]},
                "probe_before": probe.figures(until=flood_start),
                "probe_during": probe.figures(flood_start, flood_end),
                "probe_first_5s_after": probe.figures(flood_end), "window": (flood_start, flood_end)}

    without = run(None)
    without.pop("window")
    config = write_config(tmp, resolvers=(NET4, ROGUE_DNS4))
    lab.start_daemon(config)
    sampler = Sampler(daemon_pid(lab), 0.5)
    with_ = run(sampler)
    flood_start, flood_end = with_.pop("window")
    counters = status(lab, config)["counters"]
    during = [s for s in sampler.samples if flood_start <= s[0] < flood_end]
    queue = lab.vm.run("cat", "/proc/net/netfilter/nfnetlink_queue").stdout.split()  # see nfnetlink_queue.c
    return {
        "offered_qps": qps, "seconds": seconds, "hammer_connects_per_s": hammer_rate,
        "without_ramfw": without,
        "with_ramfw": {
            **with_,
            "daemon_rss_mib": {"before": round(sampler.samples[0][1] / 1024, 1),
                               "max": round(max(s[1] for s in sampler.samples) / 1024, 1),
                               "after": round(sampler.samples[-1][1] / 1024, 1)},
            "daemon_cpu_share_during": round((during[-1][2] - during[0][2]) / (during[-1][0] - during[0][0]), 2),
            "daemon_counters": {k: v for k, v in counters.items() if isinstance(v, int) and v},
            "kernel_queue": {"dropped_full": int(queue[5]), "dropped_unsent": int(queue[6])} if queue else {},
        },
    }


def soak(lab, tmp, minutes: float = 10, qps: int = 500) -> dict:
    """A steady mix for ``minutes``: allowlisted names asked again and again, other names, and a
    stream of one-off allowlisted names (a fifth of the queries, each with its own IPv6 address),
    all with TTL 5 s, so that learned addresses keep expiring (timeout 5 + 5 s grace)."""
    start_responder(lab, NET4, ttl=5)
    config = write_config(tmp, "ttl_min = 5\nttl_grace = 5")
    lab.start_daemon(config)
    sampler = Sampler(daemon_pid(lab), 10)
    seconds = int(minutes * 60)
    total = qps * seconds
    names = Path(tmp, "soak.txt")
    with names.open("w") as out:
        for i in range(total):
            kind = i % 5
            out.write(f"one-off-{i}.allowed-registry.test AAAA\n" if kind == 0 else
                      f"h{i % 100}.allowed-registry.test A\n" if kind < 3 else f"h{i % 5000}.other-name.test A\n")
    probe = Probe(lab, "soak-probe-", interval=1.0)
    sampler.start()
    probe.start()
    load = dnsperf(lab, names, qps, seconds)
    load_out = load.communicate(seconds + 60)[0]
    probe.stop.set()
    probe.join()
    sampler.stop.set()
    sampler.join()
    steady = [s for s in sampler.samples if s[0] - sampler.samples[0][0] >= 60]  # after the first minute

    # The daemon's view and the kernel's, each address with at least 3 s to live (the two are
    # read a moment apart while addresses keep expiring): each must hold the other's.
    document = status(lab, config)
    daemon_view = {e["address"] for entries in document["learned"].values() for e in entries if e["expires_in"] >= 3}
    with lab.vm.inside():
        kernel = list(Table("ramfw").learned())
    kernel_view = {e.address for e in kernel if e.expires >= 3}
    daemon_all = {e["address"] for entries in document["learned"].values() for e in entries}
    lab.resolve("after-the-soak.allowed-registry.test", "AAAA")
    with lab.vm.inside():
        still_learning = any(e.name == "after-the-soak.allowed-registry.test" for e in Table("ramfw").learned())
    return {
        "minutes": minutes, "qps": qps, "dnsperf": dnsperf_figures(load_out),
        "probe": probe.figures(),
        "rss_mib_first_minute_end": round(steady[0][1] / 1024, 1) if steady else None,
        "rss_mib_end": round(sampler.samples[-1][1] / 1024, 1),
        "rss_slope_kib_per_min_after_first_minute": slope_kib_per_min(steady) if len(steady) > 2 else None,
        "rss_samples_mib": [round(s[1] / 1024, 1) for s in sampler.samples],
        "learned_in_status": sum(len(entries) for entries in document["learned"].values()),
        "kernel_elements": len(kernel),
        "daemon_has_but_kernel_lacks": len(daemon_view - {e.address for e in kernel}),
        "examples": [(name, e) for name, entries in document["learned"].items() for e in entries
                     if e["address"] in daemon_view - {k.address for k in kernel}][:5],
        "kernel_has_but_daemon_lacks": len(kernel_view - daemon_all),
        "learning_after_the_soak": still_learning,
        "status_counters_at_end": {k: v for k, v in document["counters"].items() if isinstance(v, int) and v},
    }
