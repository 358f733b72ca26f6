"""End to end: `ramfw check` against the lab's allowed, blocked and redirecting registries
agrees with real `docker pull`s, before and after the policy change it suggests (issue 11)."""

import json
from pathlib import Path

from tests.e2e import test_docker as lab_e2e
from tests.e2e.test_docker import POLICY, fresh, pull, restart_daemon, write_policy
from tests.lab.registry import IMAGE
from tests.lab.sandbox import CDN4, RAMFW, ROOT

world = lab_e2e.world  # the same lab as test_docker's: registries, dockerd, a ramfw daemon (engine scope)


def check(world, *images, config=None, text=False):
    """`ramfw check` in the vm, trusting the CA the way the lab's dockerd does: certs.d/<host>/ca.crt."""
    certs = world.registries.dir / "vm" / "etc-docker" / "certs.d"
    result = world.ramfw("check", *(() if text else ("--json",)), "--config", config or world.config,
                         "--certs-dir", str(certs), *images)
    if text:
        return result.returncode, result.stdout
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def hosts(report, image=0):
    return {row["host"]: row for row in report["images"][image]["hosts"] if row["source"] == "probe"}


def test_the_allowed_registry_is_allowed_and_the_pull_works(world):
    code, report = check(world, f"allowed-registry.test/{IMAGE}")
    assert code == 0, report
    row = hosts(report)["allowed-registry.test"]
    assert row["policy"] == "allowed" and row["entry"] == "allowed-registry.test"
    assert row["kernel"] == "learned" and row["learned_as"] == ["allowed-registry.test"]
    assert set(row["roles"]) == {"registry", "blobs"} and report["add"] == []
    assert report["images"][0]["by"] == "the ramfw daemon"
    fresh(world)
    result, _ = pull(world, f"allowed-registry.test/{IMAGE}")
    assert result.returncode == 0, result.stderr


def test_the_blocked_registry_is_named_with_the_entry_to_add_and_the_pull_fails(world):
    code, text = check(world, f"blocked-registry.test/{IMAGE}", text=True)
    assert code == 1
    assert "the pull would fail: the policy blocks blocked-registry.test" in text
    assert "add: blocked-registry.test" in text and '{"address": "blocked-registry.test"}' in text
    code, report = check(world, f"blocked-registry.test/{IMAGE}")
    row = hosts(report)["blocked-registry.test"]
    assert code == 1 and row["policy"] == "blocked" and row["kernel"] == "not learned"
    assert report["add"] == ["blocked-registry.test"]
    result, _ = pull(world, f"blocked-registry.test/{IMAGE}")
    assert result.returncode != 0 and "connection refused" in result.stderr


def test_the_redirecting_registry_needs_its_cdn_and_after_adding_it_check_and_pull_agree(world):
    image = f"redirect-registry.test/{IMAGE}"
    code, report = check(world, image)
    rows = hosts(report)
    assert code == 1, report
    assert rows["redirect-registry.test"]["policy"] == "allowed"
    assert rows["redirect-registry.test"]["answer"] == "HTTP 307 to blobs.redirect-cdn.test"
    cdn = rows["blobs.redirect-cdn.test"]
    assert cdn["policy"] == "blocked" and cdn["kernel"] == "not learned" and cdn["roles"] == ["blobs redirect"]
    assert report["add"] == ["blobs.redirect-cdn.test"]
    fresh(world)
    result, _ = pull(world, image)
    assert result.returncode != 0, "check said it would fail"
    write_policy(world.policy, POLICY + report["add"])  # exactly what check suggested
    try:
        assert world.ramfw("reload", "--config", world.config).returncode == 0
        code, after = check(world, image)
        assert code == 0, after
        assert {row["kernel"] for row in hosts(after).values()} == {"learned"}
        fresh(world)
        result, _ = pull(world, image)
        assert result.returncode == 0, result.stderr
    finally:
        write_policy(world.policy, POLICY)
        world.ramfw("reload", "--config", world.config)


def test_several_images_at_once_exit_with_the_worst(world):
    code, report = check(world, f"allowed-registry.test/{IMAGE}", f"redirect-registry.test/{IMAGE}",
                         f"blocked-registry.test/{IMAGE}")
    assert code == 1 and [i["verdict"] for i in report["images"]] == ["allowed", "blocked", "blocked"]
    assert report["add"] == ["blobs.redirect-cdn.test", "blocked-registry.test"]
    code, report = check(world, "allowed-registry.test/test/missing:1")
    assert code == 9 and "404" in report["images"][0]["error"]
    bad = world.ramfw("check", "--config", world.config, "Allowed-Registry.test/X")
    assert bad.returncode == 2 and "lower-case" in bad.stderr


def test_only_root_may_have_the_daemon_probe(world):
    """The daemon's probes pass host scope: no other user may ask for them."""
    request = {"command": "check", "images": [f"blocked-registry.test/{IMAGE}"]}
    script = ("import json, socket, sys; s = socket.socket(socket.AF_UNIX); s.connect('\\0ramfw/ramfw'); "
              "s.sendall(sys.argv[1].encode() + b'\\n'); print(s.makefile().readline())")
    result = world.vm.run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
                          script, json.dumps(request))
    assert json.loads(result.stdout) == {"ok": False, "error": "check needs root"}
    unprivileged = world.vm.run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *RAMFW, "check",
                                f"blocked-registry.test/{IMAGE}", check=False,
                                cwd=str(ROOT), env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert unprivileged.returncode == 6 and "needs root" in unprivileged.stderr


def test_with_the_daemon_stopped_check_probes_itself_and_still_agrees_with_pulls(world):
    """Enforcement stays (fail closed) and so do the addresses learned before; nothing new is
    learned. check then probes from its own process, against the policy the daemon recorded."""
    world.daemon.terminate()
    assert world.daemon.wait(10) == 0
    try:
        code, report = check(world, f"allowed-registry.test/{IMAGE}", f"redirect-registry.test/{IMAGE}")
        assert code == 1 and report["add"] == ["blobs.redirect-cdn.test"], report
        assert {i["by"] for i in report["images"]} == {"ramfw check"}
        assert any(note.startswith("no daemon answers") for note in report["notes"])
        assert hosts(report)["allowed-registry.test"]["kernel"] == "learned", "learned before the daemon stopped"
        assert hosts(report, 1)["blobs.redirect-cdn.test"]["kernel"] == "not learned"
        fresh(world)  # the three registries serve one image: a pull with its layers at hand needs no blob
        assert pull(world, f"redirect-registry.test/{IMAGE}")[0].returncode != 0
        assert pull(world, f"allowed-registry.test/{IMAGE}")[0].returncode == 0
    finally:
        world.daemon = world.start_daemon(world.config)


def test_in_host_scope_the_probe_is_the_daemons_own_traffic_and_no_one_elses(world, tmp_path):
    """The daemon probes in a control thread: its connections pass host scope by its cgroup (as
    its policy polls do), so it follows the redirect to the CDN the policy blocks; any other
    process of the VM is still refused there."""
    host = tmp_path / "host.toml"
    host.write_text(Path(world.config).read_text().replace(
        "[enforcement]\n", '[enforcement]\nscope = ["engine", "host"]\n'))
    restart_daemon(world, str(host))
    try:
        code, report = check(world, f"redirect-registry.test/{IMAGE}", config=str(host))
        cdn = hosts(report)["blobs.redirect-cdn.test"]
        assert code == 1 and cdn["answer"] == "HTTP 200" and cdn["policy"] == "blocked", report
        assert any("exempt from host scope by its cgroup" in note for note in report["notes"]), report["notes"]
        assert world.connect(CDN4, 443)[0] == "refused", "host scope still holds for every other process"
    finally:
        restart_daemon(world, world.config)
