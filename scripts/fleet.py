"""The fleet benchmarks (issue #12): one signed policy, a real HTTPS origin, many pollers.

1. ``fleet``: Debian's nginx serves ``policy.json`` and its minisign signature over TLS (a
   throw-away CA) on a test host; in the vm namespace, N simulated VMs poll it with the
   daemon's own code (``policy.source.UrlSource``: conditional GETs, signature checks;
   ``policy.schedule``: a random first phase, jitter), the 5-minute interval compressed.
   All N start at once (a fleet booted from one image), run in steady state, then a new
   signed version is published. Reported: requests/s at the origin and the share answered
   304 (from nginx's access log), the origin's CPU (its processes' utime + stime), and the
   time until each poller applied the new version (p50, p99, max).
2. ``fleet_daemons``: ten real daemons in ten namespaces poll the same origin; a new signed
   version is applied by all within interval + jitter; a replayed older version and a badly
   signed one are refused by all, the old policy still enforced (real connections).

Not tests: figures. ``scripts/bench.py fleet fleet_daemons`` runs them.
"""

from __future__ import annotations

import heapq
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.lab.origin import make_ca  # noqa: E402
from tests.lab.sandbox import ALLOWED4, BLOCKED4, NET4, RAMFW, Netns, run  # noqa: E402
from tests.support.signing import Signer, policy_text  # noqa: E402

PORT = 8443
MARK = 0x52410000
NGINX_CONF = """
user root;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 8192; }}
http {{
    log_format fleet '$msec $status $request_uri $body_bytes_sent';
    access_log {tmp}/access.log fleet;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    keepalive_timeout 5;
    types {{ application/json json; }}
    server {{
        listen {address}:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {tmp}/www;
        etag on;
    }}
}}
"""


def pct(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] if ordered else None


def start_nginx(lab, tmp: Path) -> subprocess.Popen:
    ca, cert, key = make_ca(tmp, NET4)
    (tmp / "www").mkdir(exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, address=NET4, port=PORT, cert=cert, key=key))
    proc = lab.net.popen("nginx", "-c", str(conf), "-g", "daemon off;", stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    lab.processes.append(proc)
    deadline = time.monotonic() + 5
    while f"{NET4}:{PORT} " not in lab.net.run("ss", "-tlnH").stdout + " ":
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nginx did not start: {proc.stderr.read().decode() if proc.poll() is not None else ''}")
        time.sleep(0.05)
    return proc


def nginx_cpu(master: int) -> float:
    """Seconds of CPU the nginx master and its workers have used."""
    tick = os.sysconf("SC_CLK_TCK")
    pids = [master] + [int(p) for p in run("pgrep", "-P", str(master), check=False).stdout.split()]
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return total / tick


def publish(www: Path, signer: Signer, tmp: Path, text: str, name: str) -> None:
    install(www, *signer.signed(tmp, text, name))


def install(www: Path, body: bytes, sig: bytes) -> None:
    """The signature first, then the policy, each replaced whole (what an admin's upload does)."""
    for target, data in (("policy.json.minisig", sig), ("policy.json", body)):
        staged = www / f".{target}.new"
        staged.write_bytes(data)
        os.replace(staged, www / target)


def access_log(path: Path) -> list[tuple[float, int, str, int]]:
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4:
            rows.append((float(parts[0]), int(parts[1]), parts[2], int(parts[3])))
    return rows


# -- 1. simulated VMs ----------------------------------------------------------------------------
def pollers_child(args: dict) -> dict:
    """In the vm namespace: ``n`` UrlSources on the daemon's schedule. Publishes version 2
    at ``publish_at`` seconds and runs until every one has applied it (or a deadline)."""
    from ramfw.config import PolicySettings
    from ramfw.policy import schedule
    from ramfw.policy.source import UrlSource

    n, interval, jitter = args["n"], args["interval"], args["jitter"]
    tmp, www = Path(args["tmp"]), Path(args["tmp"]) / "www"
    sources = [UrlSource(PolicySettings(
        source=args["url"], cache=f"{tmp}/vms/{i}/policy.json", ca_file=args["ca"], signatures="require",
        trusted_keys=(args["key"],), refresh_interval=interval, refresh_jitter=jitter)) for i in range(n)]
    rng = random.SystemRandom()
    start = time.time()
    heap = [(start, i, True) for i in range(n)]  # every VM boots at once and fetches
    failures = [0] * n
    applied: dict[int, float] = {}
    outcomes: dict[str, int] = {}
    lock, wake = threading.Lock(), threading.Condition()
    published = {"at": None}
    end = start + args["publish_at"] + 3 * interval

    def worker():
        while True:
            with wake:
                while True:
                    now = time.time()
                    if now > end or len(applied) == n:
                        wake.notify_all()
                        return
                    if heap and heap[0][0] <= now:
                        due, i, first = heapq.heappop(heap)
                        break
                    wake.wait(min(0.05, heap[0][0] - now) if heap else 0.05)
            src = sources[i]
            changed = src.refresh()
            failures[i] = failures[i] + 1 if src.failed else 0
            kind = src.outcome.split(":")[0][:40]
            with lock:
                outcomes[kind] = outcomes.get(kind, 0) + 1
                if changed and src.accepted.version == 2 and published["at"] is not None:
                    applied[i] = time.time() - published["at"]
            delay = schedule.first_delay(interval, rng.random()) if first else schedule.next_delay(
                interval, jitter, rng.random(), failures[i], 3600, src.retry_after)
            with wake:
                heapq.heappush(heap, (time.time() + delay, i, False))
                wake.notify()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args["threads"])]
    for t in threads:
        t.start()
    time.sleep(max(0.0, start + args["publish_at"] - time.time()))
    install(www, (tmp / "v2.json").read_bytes(), (tmp / "v2.json.minisig").read_bytes())
    published["at"] = time.time()
    for t in threads:
        t.join()
    delays = sorted(applied.values())
    return {"start": start, "published_at": published["at"], "applied": len(applied), "n": n,
            "apply_p50_s": round(pct(delays, 50), 2) if delays else None,
            "apply_p99_s": round(pct(delays, 99), 2) if delays else None,
            "apply_max_s": round(delays[-1], 2) if delays else None, "outcomes": outcomes}


def fleet(lab, tmp: str, n: int = 1000, interval: float = 20.0, jitter: float = 0.1, threads: int = 48) -> dict:
    """N simulated VMs against nginx; the 300 s interval compressed to ``interval``."""
    tmp = Path(tmp)
    master = start_nginx(lab, tmp)
    signer = Signer(tmp, "fleet")
    publish(tmp / "www", signer, tmp, policy_text(("allowed-registry.test", "blocked-registry.test"), version=1),
            "v1.json")
    signer.signed(tmp, policy_text(("allowed-registry.test",), version=2), "v2.json")  # published by the child
    publish_at = 3 * interval  # boot burst, then two intervals of steady state
    args = {"n": n, "interval": interval, "jitter": jitter, "tmp": str(tmp),
            "url": f"https://{NET4}:{PORT}/policy.json", "ca": str(tmp / "ca.crt"), "key": signer.line,
            "publish_at": publish_at, "threads": threads}
    cpu_before = nginx_cpu(master.pid)
    child = lab.vm.run(sys.executable, __file__, "pollers-child", json.dumps(args), cwd=str(ROOT),
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=publish_at + 5 * interval + 120)
    cpu_total = nginx_cpu(master.pid) - cpu_before
    result = json.loads(child.stdout.strip().splitlines()[-1])
    rows = access_log(tmp / "access.log")
    steady = [r for r in rows if result["start"] + interval <= r[0] < result["published_at"]]
    span = result["published_at"] - (result["start"] + interval)
    boot = [r for r in rows if r[0] < result["start"] + interval]
    per_second = len(steady) / span
    return {
        "vms": n, "interval_s": interval, "compression": round(300 / interval, 1), "jitter": jitter,
        "boot_burst_requests": len(boot),
        "steady_requests_per_s": round(per_second, 1),
        "steady_share_304": round(sum(1 for r in steady if r[1] == 304) / max(1, len(steady)), 3),
        "steady_body_bytes_per_request": round(sum(r[3] for r in steady) / max(1, len(steady)), 1),
        "policy_bytes": len((tmp / "v2.json").read_bytes()), "signature_bytes": len((tmp / "v2.json.minisig").read_bytes()),
        "origin_cpu_s": round(cpu_total, 2),
        "origin_cpu_ms_per_request": round(1000 * cpu_total / max(1, len(rows)), 3),
        "requests_total": len(rows),
        "statuses": {str(s): sum(1 for r in rows if r[1] == s) for s in sorted({r[1] for r in rows})},
        "applied": result["applied"],
        "apply_p50_s": result["apply_p50_s"], "apply_p99_s": result["apply_p99_s"],
        "apply_max_s": result["apply_max_s"],
        "apply_max_real_s": round(result["apply_max_s"] * 300 / interval, 1) if result["apply_max_s"] else None,
        "client_outcomes": result["outcomes"],
    }


# -- 2. ten real daemons -------------------------------------------------------------------------
def fleet_daemons(lab, tmp: str, count: int = 10, interval: int = 10, jitter: float = 0.1) -> dict:
    """Ten daemons in ten namespaces, each on a point-to-point link to the origin's host."""
    from ramfw import config as config_mod
    from ramfw.daemon import control

    tmp = Path(tmp)
    lab.start_dnsmasq(NET4, f"--host-record=allowed-registry.test,{ALLOWED4}",
                      f"--host-record=blocked-registry.test,{BLOCKED4}")
    lab.serve_tcp([ALLOWED4, BLOCKED4], [443])
    start_nginx(lab, tmp)
    old, new = Signer(tmp, "old"), Signer(tmp, "new")
    www = tmp / "www"
    publish(www, old, tmp, policy_text(("allowed-registry.test", "blocked-registry.test"), version=1), "v1.json")
    hosts, configs = [], []
    for i in range(count):
        ns = Netns(f"d{i}")
        lab.namespaces.append(ns)
        inside, outside = f"rfd{os.getpid() % 10000}{i}", f"rfo{os.getpid() % 10000}{i}"
        run("ip", "link", "add", inside, "netns", ns.name, "type", "veth", "peer", "name", outside,
            "netns", lab.net.name)
        here, there = f"192.0.2.{4 * i + 2}", f"192.0.2.{4 * i + 1}"
        ns.run("ip", "addr", "add", f"{here}/30", "dev", inside)
        ns.run("ip", "link", "set", inside, "up")
        ns.run("ip", "route", "add", "default", "via", there)
        lab.net.run("ip", "addr", "add", f"{there}/30", "dev", outside)
        lab.net.run("ip", "link", "set", outside, "up")
        path = tmp / f"d{i}.toml"
        path.write_text(
            f'[policy]\nsource = "https://{NET4}:{PORT}/policy.json"\ncache = "{tmp}/d{i}/policy.json"\n'
            f'refresh_interval = {interval}\nrefresh_jitter = {jitter}\nca_file = "{tmp}/ca.crt"\n'
            f'signatures = "require"\ntrusted_keys = ["{old.line}", "{new.line}"]\n'
            '[enforcement]\nengine_processes = ["ramfw-test-no-engine"]\n'
            f'[dns]\ntrusted_resolvers = ["{NET4}"]\n[daemon]\nrun_dir = "{tmp}/d{i}/run"\n')
        log = open(tmp / f"d{i}.log", "w")
        lab.processes.append(ns.popen(*RAMFW, "daemon", "--config", str(path), cwd=str(ROOT), stdout=log,
                                      stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)}))
        hosts.append(ns)
        configs.append(config_mod.load(path))
    deadline = time.monotonic() + 120
    while not all(control.answers(c) for c in configs):
        if time.monotonic() > deadline:
            raise RuntimeError("the daemons did not all start")
        time.sleep(0.2)

    def statuses():
        return [control.request(c, "status", timeout=10)["status"]["policy"] for c in configs]

    def connections():
        outcome = {}
        for ns in hosts:
            for name, address in (("allowed-registry.test", ALLOWED4), ("blocked-registry.test", BLOCKED4)):
                lab.resolve(name, source=ns)
                result = lab.connect(address, mark=MARK, source=ns)[0]
                outcome.setdefault(name, {}).setdefault(result, 0)
                outcome[name][result] += 1
        return outcome

    result: dict = {"daemons": count, "interval_s": interval, "jitter": jitter,
                    "v1": {"versions": sorted({s["version"] for s in statuses()}), "connections": connections()}}
    publish(www, new, tmp, policy_text(("allowed-registry.test",), version=2), "v2.json")
    published = time.time()
    bound = interval * (1 + jitter)
    while time.time() < published + bound + 5 and not all(s["version"] == 2 for s in statuses()):
        time.sleep(0.5)
    now = statuses()
    result["v2"] = {"applied_by": sum(1 for s in now if s["version"] == 2 and s["signer"] == new.key_id),
                    "apply_s": sorted(round(s["loaded_at"] - published, 2) for s in now if s["version"] == 2),
                    "bound_s": bound, "connections": connections()}
    for label, arrange, expect in [
        ("replayed_v1", lambda: publish(www, old, tmp, policy_text(
            ("allowed-registry.test", "blocked-registry.test"), version=1), "v1again.json"), "older than version 2"),
        ("badly_signed_v3", lambda: (publish(www, new, tmp, policy_text(("allowed-registry.test",), version=3),
                                             "v3.json"),
                                     (www / "policy.json").write_text(policy_text(
                                         ("allowed-registry.test", "blocked-registry.test"), version=3))),
         "does not verify")]:
        arrange()
        time.sleep(bound + 3)
        now = statuses()
        result[label] = {"still_v2": sum(1 for s in now if s["version"] == 2),
                         "refused_saying_why": sum(1 for s in now if expect in (s.get("url_error") or "")),
                         "connections": connections()}
    return result


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "pollers-child":
        print(json.dumps(pollers_child(json.loads(sys.argv[2]))), flush=True)
        return 0
    print("run through scripts/bench.py fleet fleet_daemons", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
