"""An upgrade with no gap: this release starting over the table ramfw 0.1.0 left.

tests/fixtures/table-0.1.0.json is that table as the kernel listed it (`nft -j list table inet
ramfw`, made by tests/fixtures/dump_release_table.py from the 0.1.0 release's code): unowned,
as 0.1.0 makes it with table_owner = false or where the kernel has no persist, with one learned
address. It is loaded into a lab namespace as nft can read it back: the table, its sets and
learned elements, its chains, and every rule nft parses again (not the DNS chains' xt queue and
bpf rules, one fib rule, the own-traffic socket rule; the listing does not parse back whole,
see docs/design.md). That table enforces by itself (checked first). Then this release's daemon
starts over it while connections are opened all the time: none to a never-learned address
may succeed, none to the learned one may fail, and the daemon says what it migrated.
"""

import json
import threading
import time
from pathlib import Path

import pytest

from ramfw.kernel import probes
from ramfw.kernel.table import Table
from tests.lab.sandbox import ALLOWED4, BLOCKED4, NET4

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "table-0.1.0.json"
MARK = 0x52410000


def load_fixture(lab) -> tuple[int, int]:
    """The fixture's table in the vm namespace; (rules loaded, rules nft cannot read back)."""
    listing = json.loads(FIXTURE.read_text())["nftables"]
    for item in listing:
        for body in item.values():
            if isinstance(body, dict):
                body.pop("handle", None)
    base = [item for item in listing if "rule" not in item and "metainfo" not in item]
    lab.vm.run("nft", "-j", "-f", "-", input=json.dumps({"nftables": base}))
    loaded = skipped = 0
    for item in listing:
        if "rule" in item:
            result = lab.vm.run("nft", "-j", "-f", "-", input=json.dumps({"nftables": [{"add": item}]}), check=False)
            loaded, skipped = (loaded + 1, skipped) if result.returncode == 0 else (loaded, skipped + 1)
    return loaded, skipped


def test_this_release_takes_over_the_0_1_0_table_in_one_step_under_traffic(lab, write_config, write_policy):
    with lab.vm.inside():
        capability = probes._table_owner_probe()
    if not capability.ok:
        pytest.skip(f"the migration to an owned table needs owner + persist: {capability.detail}")
    lab.serve_tcp([ALLOWED4, BLOCKED4], [443])
    lab.start_dnsmasq(NET4, f"--host-record=allowed-registry.test,{ALLOWED4}")
    write_policy(["allowed-registry.test"])
    config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n', scope=["engine", "host"], registry_ports=[443])
    loaded, skipped = load_fixture(lab)
    assert loaded >= 25 and skipped <= 15, (loaded, skipped)
    with lab.vm.inside():
        before = {item.address: item.name for item in Table("ramfw").learned()}
    assert before == {ALLOWED4: "allowed-registry.test"}
    # the old table enforces by itself: what it learned connects, the rest is refused
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"
    assert lab.connect(BLOCKED4, mark=MARK)[0] == "refused"
    assert lab.connect(BLOCKED4)[0] == "refused"

    outcomes: dict[str, list[str]] = {"learned": [], "never learned, engine": [], "never learned, host": []}
    stop = threading.Event()

    def traffic(kind, address, mark):
        while not stop.is_set():
            outcomes[kind].append(lab.connect(address, mark=mark, timeout=2)[0])

    threads = [threading.Thread(target=traffic, args=args) for args in
               (("learned", ALLOWED4, MARK), ("never learned, engine", BLOCKED4, MARK),
                ("never learned, host", BLOCKED4, None))]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        started = time.monotonic()
        lab.daemon = lab.start_daemon(config)
        ready = time.monotonic() - started
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert all(len(attempts) >= 20 for attempts in outcomes.values()), {k: len(v) for k, v in outcomes.items()}
    assert set(outcomes["learned"]) == {"connected"}, outcomes["learned"]
    assert set(outcomes["never learned, engine"]) == {"refused"}
    assert set(outcomes["never learned, host"]) == {"refused"}
    lab.daemon.log.seek(0)
    log = lab.daemon.log.read().decode()
    assert "was unowned" in log and "its 1 learned addresses kept" in log, log[-2000:]
    with lab.vm.inside():
        view = Table("ramfw").kernel_view()
        after = {item.address: item.name for item in Table("ramfw").learned()}
    assert view.persist and view.owner is not None and after == before
    status = json.loads(lab.ramfw("status", "--json", "--config", config).stdout)
    assert status["table"]["owned_by_daemon"] and status["enforcing"], status["message"]
    print(f"daemon ready {ready:.2f} s after start; attempts {({k: len(v) for k, v in outcomes.items()})}")
