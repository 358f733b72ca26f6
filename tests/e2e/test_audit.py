"""End to end, issue #11 part 3: an audit run of real `docker pull`s becomes, through `ramfw
report` and `ramfw policy suggest`, a policy that in enforce mode lets exactly those pulls
through and refuses another registry's."""

import json
from pathlib import Path

from ramfw import config as config_mod
from ramfw.daemon.seen import seen_path
from tests.e2e import test_docker as lab_e2e
from tests.e2e.test_docker import POLICY, fresh, pull, write_policy
from tests.lab.registry import IMAGE

world = lab_e2e.world  # the same lab as test_docker's: registries, dockerd, a ramfw daemon (engine scope)


def stop(world):
    world.daemon.terminate()
    assert world.daemon.wait(10) == 0  # what it saw is saved as it stops


def pulled(world, registry) -> bool:
    fresh(world)  # the registries serve one image: a pull with its layers at hand would need no blob host
    return pull(world, f"{registry}/{IMAGE}")[0].returncode == 0


def test_an_audit_run_of_real_pulls_becomes_a_policy_that_lets_exactly_them_through(world, tmp_path):
    state = Path(seen_path(config_mod.load(world.config)))
    audit = tmp_path / "audit.toml"
    audit.write_text(Path(world.config).read_text().replace("[enforcement]\n", '[enforcement]\nmode = "audit"\n'))
    write_policy(world.policy, ["allowed-registry.test"])  # narrower than the pulls need
    stop(world)
    state.unlink(missing_ok=True)  # this test's audit only
    world.daemon = world.start_daemon(str(audit))
    try:
        assert pulled(world, "allowed-registry.test") and pulled(world, "redirect-registry.test")  # audit refuses nothing
        stop(world)
        report = json.loads(world.ramfw("report", "--json", "--config", str(audit)).stdout)
        assert set(report["refused"]) == {"redirect-registry.test", "blobs.redirect-cdn.test"}, report["refused"]
        assert all(seen["verdict"] == "audited" and 443 in seen["ports"] for seen in report["refused"].values())
        assert report["usage"]["allowed-registry.test"]["lookups"] >= 1
        suggested = world.ramfw("policy", "suggest", "--config", str(audit))
        assert suggested.returncode == 0, suggested.stderr
        registries = json.loads(suggested.stdout)["organizations"][0]["registryAccess"]["registries"]
        assert [r["address"] for r in registries] == ["allowed-registry.test", "blobs.redirect-cdn.test",
                                                      "redirect-registry.test"]
        world.policy.write_text(suggested.stdout)
        world.daemon = world.start_daemon(world.config)  # enforce mode, the suggested policy
        assert pulled(world, "allowed-registry.test") and pulled(world, "redirect-registry.test")
        assert not pulled(world, "blocked-registry.test")
    finally:  # the fixture's daemon and policy again, for its teardown
        write_policy(world.policy, POLICY)
        if world.daemon.poll() is None:
            stop(world)
        world.daemon = world.start_daemon(world.config)
