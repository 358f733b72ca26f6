"""ramfw benchmarks, side by side in one run, in a sandbox of network namespaces.

1. Latency a held DNS reply adds (p50/p99), daemon runs and no-daemon runs interleaved, for
   an allowlisted name and another name, next to dnsmasq --nftset forwarding the same queries.
2. 1000 resolve-then-connect cycles: first connections refused or retransmitted.
3. Set programming rate (batched elements per second) and one reply's programming cost.
4. Daemon memory with 10,000 policy entries and 100,000 learned addresses.
5. ``fuzz`` (only when named): a million generated and mutated packets through the pure core.
7. ``fleet`` and ``fleet_daemons`` (only when named; scripts/fleet.py): 1,000 simulated VMs
   polling a signed policy from nginx over TLS, and ten real daemons polling one origin.
9. ``tls_ttfb`` and ``tls_pull`` (only when named; scripts/bench_tls.py): the TLS server name
   check's added time to a new connection's first byte, packets to the daemon, CPU; docker pull on/off.
8. ``restart`` (only when named): rolling restarts (SIGTERM, then a new daemon, as systemd
   and a package upgrade do) under a steady stream of lookups of new names: how long nothing
   is learned, whether DNS kept flowing, whether a learned address stayed reachable.
9. ``connect`` (only when named): what the client recorder adds to every TCP connect(), with
   and without it interleaved, and what naming a blocked packet's client costs the daemon.
6. ``flood`` and ``soak`` (only when named; scripts/load.py): 20,000 replies a second for 60 s,
   and 10 minutes of a steady mix with one-off names: lookup latency, RSS, CPU, counters.
Prints a table and writes bench-results/bench.json. Not a test: figures, not pass/fail.
"""

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the lab lives in tests/lab

from ramfw.kernel import nft, probes, ruleset
from ramfw.kernel.ruleset import Hold
from ramfw.kernel.table import Table
from ramfw.snoop.snooper import Element
from ramfw.config import EnforcementSettings
from tests.lab.sandbox import ALLOWED4, NET4, ROGUE_DNS4, Lab

MARK = 0x52410000
FLOOR_READER = """
from ramfw.kernel.queue import Queue
q = Queue(5241)
print("ready", flush=True)
while True:
    for p in q.receive():
        q.verdict(p.packet_id)
"""
QUERIES = 400
ROUNDS = 3
OUT = Path(__file__).resolve().parent.parent / "bench-results"


def pct(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] if ordered else None


def time_queries(lab, name, server, count=QUERIES):
    lab.resolve(name, server=server)
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        lab.resolve(name, server=server)
        samples.append((time.perf_counter() - start) * 1e6)
    return samples


def write_files(tmp, entries=1, max_registries=100, table_owner=True):
    policy = Path(tmp, "policy.json")
    registries = [{"address": "allowed-registry.test"}] + [
        {"address": f"registry{i}.example.com"} for i in range(entries - 1)]
    policy.write_text(json.dumps({"organizations": [{"name": "bench", "registryAccess": {
        "registries": registries}}]}))
    config = Path(tmp, "ramfw.toml")
    config.write_text(f'[policy]\nsource = "{policy}"\ncache = "{tmp}/c.json"\nmax_registries = {max_registries}\n'
                      f'[dns]\ntrusted_resolvers = ["{NET4}"]\n[daemon]\nrun_dir = "{tmp}/run"\n'
                      f'[enforcement]\ntable_owner = {str(table_owner).lower()}\n')
    return str(config)


def paired(lab, name, a, b, count=QUERIES * ROUNDS):
    """Query a then b, alternately, so both see the same machine noise; return both lists."""
    xs, ys = [], []
    lab.resolve(name, server=a[0], port=a[1])
    lab.resolve(name, server=b[0], port=b[1])
    for _ in range(count):
        for server, out in ((a, xs), (b, ys)):
            start = time.perf_counter()
            lab.resolve(name, server=server[0], port=server[1])
            out.append((time.perf_counter() - start) * 1e6)
    return xs, ys


def summary(held, plain):
    added = [h - p for h, p in zip(held, plain, strict=True)]
    return {"p50_us": round(pct(held, 50)), "p99_us": round(pct(held, 99)),
            "baseline_p50_us": round(pct(plain, 50)), "baseline_p99_us": round(pct(plain, 99)),
            "added_p50_us": round(pct(held, 50) - pct(plain, 50)),
            "added_p99_us": round(pct(held, 99) - pct(plain, 99)),
            "paired_added_p50_us": round(statistics.median(added)), "n": len(held)}


def dns_latency(lab, tmp):
    """Replies from port 53 are held by ramfw; the same server's twin on port 5353 is not.

    Queries alternate between the two, so the difference is what the hold adds. dnsmasq
    --nftset is measured the same way: its forwarder in the vm against the same query sent
    direct, and against a plain forwarder without --nftset.
    """
    results = {}
    records = (f"--host-record=allowed-registry.test,{ALLOWED4}", "--host-record=other-name.test,203.0.113.99")
    lab.start_dnsmasq(NET4, *records, port=5353)
    # The floor: a bare reader that accepts every packet at once, through the same rules.
    config = write_files(tmp)
    hold = probes.run().hold
    reader = lab.vm.popen(sys.executable, "-c", FLOOR_READER, stdout=subprocess.PIPE,
                          env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    lab.processes.append(reader)
    reader.stdout.readline()
    with lab.vm.inside():
        table = Table("ramfw")
        table.apply(ruleset.build_ruleset(EnforcementSettings(), [], 1000, hold),
                    nft.dns_chain_rules(hold if hold.holds else Hold.NONE, 5241, None, 5242))
    results["bare_queue_reader/other"] = summary(*paired(lab, "other-name.test", (NET4, 53), (NET4, 5353)))
    reader.kill()
    reader.wait()
    lab.vm.run("nft", "delete table inet ramfw")
    proc = lab.start_daemon(config)
    for name, label in (("allowed-registry.test", "allowed"), ("other-name.test", "other")):
        results[f"ramfw/{label}"] = summary(*paired(lab, name, (NET4, 53), (NET4, 5353)))
    proc.terminate()
    proc.wait(5)
    lab.vm.run("nft", "delete table inet ramfw")
    lab.vm.run("nft", "add table inet dnsmasqbench; add set inet dnsmasqbench allow4 "
               "{ type ipv4_addr; flags timeout; timeout 5m; }")
    for address, extra in (("127.0.0.1", ["--nftset=/allowed-registry.test/4#inet#dnsmasqbench#allow4"]),
                           ("127.0.0.2", [])):
        lab.processes.append(lab.vm.popen(
            "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", f"--listen-address={address}",
            "--bind-interfaces", "--port=53", "--user=root", "--pid-file=", "--cache-size=0",
            f"--server={NET4}", *extra, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(0.5)
    for name, label in (("allowed-registry.test", "allowed"), ("other-name.test", "other")):
        results[f"dnsmasq_nftset_vs_direct/{label}"] = summary(*paired(lab, name, ("127.0.0.1", 53), (NET4, 53)))
        results[f"dnsmasq_nftset_vs_plain_forwarder/{label}"] = summary(
            *paired(lab, name, ("127.0.0.1", 53), ("127.0.0.2", 53)))
    lab.vm.run("nft", "delete table inet dnsmasqbench")
    return results


def race(lab, tmp):
    config = write_files(tmp, table_owner=False)  # the address is taken out by hand: an owned table refuses that
    proc = lab.start_daemon(config)
    refused = retransmitted = 0
    lab.resolve("allowed-registry.test")
    for _ in range(1000):
        with lab.vm.inside():
            Table("ramfw").delete_elements([ALLOWED4])
        address = lab.resolve("allowed-registry.test").answer[0][0].address
        outcome, seconds = lab.connect(address, mark=MARK, timeout=3)
        refused += outcome != "connected"
        retransmitted += outcome == "connected" and seconds > 0.9
    proc.terminate()
    proc.wait(5)
    return {"cycles": 1000, "failed_first_connections": refused, "retransmitted": retransmitted}


def programming(lab):
    with lab.vm.inside():
        table = Table("rambench")
        table.apply(ruleset.build_ruleset(EnforcementSettings(table="rambench"), [], 200_000), {})
        batches, size = 100, 1000
        start = time.perf_counter()
        for b in range(batches):
            table.add_elements([Element(f"10.{b}.{i // 250}.{i % 250}", 300, "bench.test")
                                for i in range(size)])
        rate = batches * size / (time.perf_counter() - start)
        single = []
        for i in range(2000):
            start = time.perf_counter()
            table.add_elements([Element(f"198.51.100.{i % 250}", 300, "one.test")])
            single.append((time.perf_counter() - start) * 1e6)
        table.remove()
    return {"batched_elements_per_s": round(rate), "one_reply_p50_us": pct(single, 50),
            "one_reply_p99_us": pct(single, 99)}


def memory(lab, tmp):
    config = write_files(tmp, entries=10_000, max_registries=10_000)
    proc = lab.start_daemon(config)
    proc.terminate()
    proc.wait(5)
    with lab.vm.inside():
        table = Table("ramfw")
        for b in range(100):
            table.add_elements([Element(f"10.{b}.{i // 250}.{i % 250}", 3600,
                                                f"registry{(b * 1000 + i) % 9999}.example.com")
                                for i in range(1000)])
    start = time.perf_counter()
    proc = lab.start_daemon(config, wait=300)
    restart_s = time.perf_counter() - start
    pid = lab.vm.processes(b"daemon")[0]

    def rss():
        return next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("VmRSS"))
    rss_running = rss()
    status = json.loads(lab.ramfw("status", "--json", "--config", config).stdout)
    rss_after_status = rss()
    proc.terminate()
    proc.wait(5)
    return {"policy_entries": status["policy"]["entries"], "learned_addresses": status["counters"]["learned_addresses"],
            "rss_mb": round(rss_running / 1024, 1), "rss_after_full_status_mb": round(rss_after_status / 1024, 1),
            "restart_with_100k_learned_s": round(restart_s, 1)}


def docker_pull(lab, tmp, rounds=20):
    """docker pull of a 5-layer image (5 x 8 MB) through ramfw and without it, interleaved,
    after one warm-up pull of each kind that is not counted."""
    from tests.lab.registry import IMAGE, RegistryLab

    registries = RegistryLab(lab, Path(tmp) / "registries", layers=5, layer_bytes=8 << 20)
    try:
        registries.start_engine()  # ramfw finds dockerd and containerd by itself
        config = Path(write_files(tmp))
        config.write_text(config.read_text() + f'[enforcement]\nbpffs = "{tmp}/bpffs"\n')
        times = {"with_ramfw": [], "without_ramfw": []}
        for round_ in range(rounds + 1):
            for mode in times:
                ids = registries.docker("images", "-q").stdout.split()
                if ids:
                    registries.docker("rmi", "-f", *set(ids))
                proc = lab.start_daemon(str(config)) if mode == "with_ramfw" else None
                time.sleep(1)  # let both states settle the same way before timing
                start = time.perf_counter()
                registries.docker("pull", f"allowed-registry.test/{IMAGE}")
                if round_:  # round 0 warms up caches on both sides
                    times[mode].append(time.perf_counter() - start)
                if proc:
                    lab.ramfw("down", "--config", str(config))
                    proc.wait(10)
    finally:
        registries.close()
        subprocess.run(["umount", f"{tmp}/bpffs"], capture_output=True)
    with_, without = statistics.median(times["with_ramfw"]), statistics.median(times["without_ramfw"])
    paired = statistics.median(w / o for w, o in zip(times["with_ramfw"], times["without_ramfw"], strict=True))
    return {"image": "5 layers x 8 MB", "rounds": rounds, "median_with_s": round(with_, 3),
            "median_without_s": round(without, 3), "ratio": round(with_ / without, 3),
            "paired_ratio_median": round(paired, 3),
            "with_s": [round(t, 3) for t in times["with_ramfw"]],
            "without_s": [round(t, 3) for t in times["without_ramfw"]]}


def fuzz_core(lab, tmp, messages=420_000):
    """At least 1,000,000 generated and mutated packets fed to the pure core (tests/support/fuzz.py):
    exceptions escaping and disagreements with dnspython, and the rate."""
    from tests.support.fuzz import fuzz

    start = time.perf_counter()
    found = fuzz(messages, seed=2026)
    seconds = time.perf_counter() - start
    return {**{k: v for k, v in found.items() if k != "examples"}, "examples": found["examples"][:3],
            "seconds": round(seconds, 1), "packets_per_second": int(found["packets"] / seconds)}


def restart(lab, tmp, restarts=5, names=4000, interval=0.004):
    """Each lookup is of a name never asked before (its own AAAA address), so the set shows,
    afterwards, which replies were learned: the gap is the span of unlearned lookups around
    each restart. Meanwhile a connection to an address learned earlier is opened at every
    lookup (a pull in progress must not notice the restart)."""
    records = [f"--host-record=n{i}.allowed-registry.test,2001:db8::a:{i:x}" for i in range(names)]
    lab.start_dnsmasq(ROGUE_DNS4, *records, ttl=3600)  # a second resolver on the lab's "internet", trusted here
    config = write_files(tmp)
    text = Path(config).read_text().replace(f'trusted_resolvers = ["{NET4}"]', f'trusted_resolvers = ["{NET4}", "{ROGUE_DNS4}"]')
    Path(config).write_text(text)
    daemon = lab.start_daemon(config)
    lab.resolve("allowed-registry.test")
    asked, failed_dns, failed_connects, i = [], 0, 0, 0
    restarts_at, downtime, failed_at = [], [], []  # (ms to stop, ms until the new daemon answers)

    def lookups_until(deadline):
        nonlocal i, failed_dns, failed_connects
        while time.monotonic() < deadline and i < names:
            at = time.monotonic()
            try:
                lab.resolve(f"n{i}.allowed-registry.test", "AAAA", server=ROGUE_DNS4)
            except Exception:
                failed_dns += 1
                failed_at.append(at)
            asked.append((at, f"2001:db8::a:{i:x}"))
            i += 1
            failed_connects += lab.connect(ALLOWED4, mark=MARK, timeout=2)[0] != "connected"  # learned at the start
            time.sleep(interval)

    import threading
    for _ in range(restarts):
        lookups_until(time.monotonic() + 1)
        done = threading.Event()

        def roll():
            nonlocal daemon
            restarts_at.append(time.monotonic())
            daemon.terminate()
            daemon.wait(10)
            stopped = time.monotonic()
            daemon = lab.start_daemon(config)
            downtime.append((round((stopped - restarts_at[-1]) * 1000), round((time.monotonic() - stopped) * 1000)))
            done.set()

        roller = threading.Thread(target=roll)
        roller.start()
        while not done.is_set():
            lookups_until(time.monotonic() + 0.05)
        roller.join()
        lookups_until(time.monotonic() + 1)
    with lab.vm.inside():
        learned = {item.address for item in Table("ramfw").learned()}
    daemon.terminate()
    daemon.wait(10)
    gaps, missed = [], []  # per restart: first to last unlearned lookup (ms), how many
    for at, until in zip(restarts_at, [*restarts_at[1:], float("inf")]):  # each restart's own window
        window = [t for t, address in asked if address not in learned and at - 0.5 <= t < until - 0.5]
        gaps.append(round((max(window) - min(window)) * 1000) if window else 0)
        missed.append(len(window))
    unlearned = sum(address not in learned for _, address in asked)
    return {"restarts": restarts, "lookups": len(asked), "unlearned_lookups": unlearned,
            "gap_ms": gaps, "unlearned_per_restart": missed, "gap_ms_median": round(statistics.median(gaps)), "gap_ms_max": max(gaps),
            "stop_ms_then_start_ms": downtime, "failed_lookups": failed_dns,
            # where each failed lookup was sent: ms from the nearest SIGTERM (negative: before it)
            "failed_lookups_ms_from_restart": [round(min((t - r for r in restarts_at), key=abs) * 1000) for t in failed_at],
            "failed_connects_to_learned": failed_connects}


def connect_cost(lab, tmp, rounds=10, connects=1000):
    """What the client recorder (issue #11) adds to every TCP connect() on the VM: loopback
    connects in the vm, rounds with the recorder attached and without interleaved; and what
    naming one blocked packet's client costs the daemon (the kernel record, /proc, the cgroup)."""
    import socket
    import struct

    from ramfw.daemon.clients import Clients
    from ramfw.kernel import bpf
    from ramfw.kernel.clients import ClientRecorder
    from ramfw.snoop.packet import TCP, Flow

    with lab.vm.inside():
        server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4096)
    address = server.getsockname()

    def timed() -> list[float]:
        samples = []
        for _ in range(connects):
            with lab.vm.inside():
                client = socket.socket()
            start = time.perf_counter()
            client.connect(address)
            samples.append(time.perf_counter() - start)
            # closed with a reset: thousands of TIME_WAIT ports would slow the connects that follow
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            server.accept()[0].close()
        return samples

    recorded: dict[str, list[float]] = {"helpers": [], "task": []}  # the two ways the kernel may take it
    without: list[float] = []
    for round_ in range(rounds):
        if round_ % 2:
            without += timed()
        for how, samples in recorded.items():
            recorder = ClientRecorder(bpf.cgroup2_mount(), count_ports=(443,), only=how)
            samples += timed()
            recorder.close()
        if not round_ % 2:
            without += timed()
    clients = Clients(None, str(Path(tmp) / "no-engine.sock"))
    with lab.vm.inside():
        client = socket.socket()
    client.connect(address)
    local = client.getsockname()
    flow = Flow(TCP, local[0], local[1], address[0], address[1])
    naming = []
    for _ in range(2000):
        start = time.perf_counter()
        clients.describe(flow)
        naming.append(time.perf_counter() - start)
    client.close()
    clients.close()
    server.close()
    us = lambda values, p: round(pct(values, p) * 1e6, 1)  # noqa: E731
    result = {"connects": len(without), "baseline_p50_us": us(without, 50), "baseline_p99_us": us(without, 99),
              "naming_one_block_p50_us": us(naming, 50), "naming_one_block_p99_us": us(naming, 99)}
    for how, samples in recorded.items():
        result.update({f"{how}_p50_us": us(samples, 50), f"{how}_p99_us": us(samples, 99),
                       f"{how}_added_p50_us": round(us(samples, 50) - us(without, 50), 1)})
    return result


def main():
    results = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": f"{subprocess.getoutput('nproc')} cores"}
    only = sys.argv[1:] or ["dns_latency", "race", "programming", "memory", "docker_pull"]
    from scripts import bench_tls, fleet, load

    steps = {"dns_latency": dns_latency, "race": race, "programming": None, "memory": memory,
             "docker_pull": docker_pull, "fuzz": fuzz_core, "flood": load.flood, "soak": load.soak,
             "fleet": fleet.fleet, "fleet_daemons": fleet.fleet_daemons, "restart": restart,
             "connect": connect_cost, "tls_ttfb": bench_tls.tls_ttfb, "tls_pull": bench_tls.tls_pull}
    for name, fn in ((n, steps[n]) for n in only):
        lab = Lab()
        try:
            if name not in ("docker_pull", "flood", "soak", "fleet_daemons", "tls_ttfb", "tls_pull"):  # own DNS
                lab.start_dnsmasq(NET4, f"--host-record=allowed-registry.test,{ALLOWED4}",
                                  "--host-record=other-name.test,203.0.113.99")
                lab.serve_tcp([ALLOWED4], [443])
            with tempfile.TemporaryDirectory() as tmp:
                results[name] = programming(lab) if fn is None else fn(lab, tmp)
        finally:
            lab.close()
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "bench.json").write_text(json.dumps(results, indent=1))
    if len(results) < 7:
        return 0
    lat = results["dns_latency"]
    print("\nDNS reply latency (µs)                         p50    p99  base p50  base p99  added p50  added p99  paired p50")
    for key in sorted(lat):
        v = lat[key]
        print(f"  {key:42} {v['p50_us']:6} {v['p99_us']:6} {v['baseline_p50_us']:9} {v['baseline_p99_us']:9}"
              f" {v['added_p50_us']:10} {v['added_p99_us']:10} {v['paired_added_p50_us']:11}")
    print(f"resolve-then-connect: {results['race']}")
    print(f"set programming:      {results['programming']}")
    print(f"daemon memory:        {results['memory']}")
    print(f"docker pull:          {results['docker_pull']}")
    print(f"written to {OUT / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
