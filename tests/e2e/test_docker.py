"""End to end: a real Docker engine pulling, pushing and building through ramfw."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from ramfw.kernel import bpf
from tests.lab.registry import HOSTS_FILE_ONLY, IMAGE
from tests.lab.sandbox import ALLOWED4, BLOCKED4
from tests.lab.world import config_text, engine_world, missing, write_policy

POLICY = ["allowed-registry.test", "redirect-registry.test"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    reason = missing()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("e2e")
    with engine_world(tmp) as lab:
        lab.registries.import_images()
        lab.policy = tmp / "policy.json"
        write_policy(lab.policy, POLICY)
        lab.config = str(tmp / "ramfw.toml")
        Path(lab.config).write_text(config_text(tmp, lab.policy, f'engine_socket = "{lab.registries.socket}"\n'))
        lab.daemon = lab.start_daemon(lab.config)
        yield lab


def status(world):
    return json.loads(world.ramfw("status", "--json", "--config", world.config).stdout)


def fresh(world):
    """No images from the registries: every pull downloads its layers again."""
    listing = world.registries.docker("images", "--format", "{{.Repository}} {{.ID}}").stdout.split("\n")
    ids = {line.split()[1] for line in listing if line and not line.startswith("local/")}
    if ids:
        world.registries.docker("rmi", "-f", *ids, check=False)


def pull(world, reference):
    start = time.monotonic()
    result = world.registries.docker("pull", reference, check=False)
    return result, time.monotonic() - start


def blocks(world):
    return [b["message"] for b in status(world)["recent_blocks"]]


def wait_for_block(world, message):
    deadline = time.monotonic() + 5
    while message not in blocks(world):
        assert time.monotonic() < deadline, blocks(world)
        time.sleep(0.1)


def test_engine_scope_finds_and_marks_dockerd_and_containerd_in_their_own_cgroups(world):
    """Issue #9, 1: a stock layout (two services), no engine cgroup configured."""
    engine = status(world)["engine"]
    assert engine["attached"] and engine["loader"].startswith(("bcc", "hand-assembled"))
    marked = {row["path"] for row in engine["cgroups"] if row["marked"]}
    assert marked == {str(world.registries.cgroup), str(world.registries.containerd_cgroup)}


def test_a_pull_right_after_the_engine_restarts_is_refused_20_times_of_20(world):
    """Issue #9, 3: systemd's restart makes docker.service's cgroup again, without the program."""
    outcomes = []
    for _ in range(20):
        world.registries.restart_dockerd()
        result, _ = pull(world, f"blocked-registry.test/{IMAGE}")
        outcomes.append("refused" if "connection refused" in result.stderr else result.stderr[-200:] or "pulled")
    assert outcomes == ["refused"] * 20
    assert world.ramfw("status", "--config", world.config).returncode == 0


def test_pull_from_the_allowed_registry_succeeds(world):
    fresh(world)
    result, _ = pull(world, f"allowed-registry.test/{IMAGE}")
    assert result.returncode == 0, result.stderr


def test_pull_from_the_blocked_registry_fails_at_once_and_says_why(world):
    result, seconds = pull(world, f"blocked-registry.test/{IMAGE}")
    assert result.returncode != 0 and "connection refused" in result.stderr
    assert seconds < 1.5
    wait_for_block(world, "registry access to blocked-registry.test is not allowed")
    text = world.ramfw("status", "--config", world.config).stdout
    assert "registry access to blocked-registry.test is not allowed" in text


def test_a_blocked_pull_is_named_with_dockerd_its_pid_and_executable(world):
    """Issue #11, 1: the kernel recorded who connected; the event names the engine and the host."""
    dockerd = int((world.registries.dir / "vm" / "docker.pid").read_text())
    result, _ = pull(world, f"blocked-registry.test/{IMAGE}")
    assert result.returncode != 0 and "connection refused" in result.stderr
    client = wait_for_client(world, lambda c: c.get("pid") == dockerd)
    assert client["comm"] == "dockerd" and Path(client["exe"]).name == "dockerd"
    assert client["cgroup"] == "/" + str(world.registries.cgroup.relative_to(bpf.cgroup2_mount()))
    text = world.ramfw("status", "--config", world.config).stdout
    assert (f"registry access to blocked-registry.test is not allowed ({BLOCKED4} port 443) by dockerd "
            f"(pid {dockerd}, uid 0, {client['exe']}") in text
    assert "to allow:   ask your administrators to add blocked-registry.test" in text


def wait_for_client(world, where) -> dict:
    deadline = time.monotonic() + 10
    while True:
        found = [b["client"] for b in status(world)["recent_blocks"] if where(b.get("client") or {})]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, status(world)["recent_blocks"]
        time.sleep(0.2)


def test_redirected_blobs_need_their_cdn_name(world):
    fresh(world)
    result, _ = pull(world, f"redirect-registry.test/{IMAGE}")
    assert result.returncode != 0
    wait_for_block(world, "registry access to blobs.redirect-cdn.test is not allowed")
    write_policy(world.policy, POLICY + ["redirect-cdn.test"])
    try:
        assert world.ramfw("reload", "--config", world.config).returncode == 0
        result, _ = pull(world, f"redirect-registry.test/{IMAGE}")
        assert result.returncode == 0, result.stderr
    finally:
        write_policy(world.policy, POLICY)
        world.ramfw("reload", "--config", world.config)


def test_push_is_restricted_like_pull(world):
    fresh(world)
    assert pull(world, f"allowed-registry.test/{IMAGE}")[0].returncode == 0
    docker = world.registries.docker
    docker("tag", f"allowed-registry.test/{IMAGE}", "allowed-registry.test/test/pushed:1")
    docker("tag", f"allowed-registry.test/{IMAGE}", "blocked-registry.test/test/pushed:1")
    assert docker("push", "allowed-registry.test/test/pushed:1", check=False).returncode == 0
    blocked = docker("push", "blocked-registry.test/test/pushed:1", check=False)
    assert blocked.returncode != 0 and "connection refused" in blocked.stderr


def test_dockerfile_add_url_is_restricted(world, tmp_path):
    for host, ok in (("allowed-registry.test", True), ("blocked-registry.test", False)):
        context = tmp_path / host
        context.mkdir()
        (context / "Dockerfile").write_text(f"FROM scratch\nADD https://{host}/files/hello.txt /hello.txt\n")
        result = world.registries.docker("build", "--no-cache", "-q", str(context), check=False,
                                         DOCKER_BUILDKIT="0")
        assert (result.returncode == 0) is ok, result.stderr


def test_buildkit_builds_are_restricted_like_pulls(world):
    """Issue #9, 5: BuildKit, the default builder since Engine 23, runs in dockerd: its base-image
    pulls and ADD downloads are the engine's (driven through the Engine API: see buildkit())."""
    cases = {f"FROM allowed-registry.test/{IMAGE}\n": "",
             f"FROM blocked-registry.test/{IMAGE}\n": "connection refused",
             "FROM scratch\nADD https://allowed-registry.test/files/hello.txt /hello.txt\n": "",
             "FROM scratch\nADD https://blocked-registry.test/files/hello.txt /hello.txt\n": "connection refused"}
    for dockerfile, expected in cases.items():
        error = world.registries.buildkit(dockerfile)
        assert (expected in error) if expected else error == "", (dockerfile, error)


def test_from_in_a_dockerfile_is_restricted_like_a_pull(world, tmp_path):
    """The classic builder's base-image pulls (DOCKER_BUILDKIT=0)."""
    for name, ok in (("allowed-registry.test", True), ("blocked-registry.test", False)):
        context = tmp_path / name
        context.mkdir()
        (context / "Dockerfile").write_text(f"FROM {name}/{IMAGE}\n")
        result = world.registries.docker("build", "--no-cache", "-q", str(context), check=False, DOCKER_BUILDKIT="0")
        assert (result.returncode == 0) is ok, (name, result.stderr[-600:])


def test_published_ports_work_over_loopback_and_from_the_bridge(world):
    """Issue #9, 5: docker-proxy is dockerd's child, so its sockets are marked; its connections
    to the container went to the registry chain and were rejected."""
    docker = world.registries.docker
    docker("run", "-d", "--name", "web", "-p", "8080:80", "local/busybox:1", "sh", "-c",
           "mkdir /www && echo hello > /www/index.html && exec httpd -f -p 80 -h /www")
    try:
        deadline = time.monotonic() + 10
        while (page := world.vm.run("busybox", "wget", "-qO-", "http://127.0.0.1:8080/", check=False)).stdout != "hello\n":
            assert time.monotonic() < deadline, page.stderr
            time.sleep(0.2)
        gateway = docker("network", "inspect", "bridge", "--format", "{{(index .IPAM.Config 0).Gateway}}").stdout.strip()
        other = docker("run", "--rm", "local/busybox:1", "wget", "-qO-", f"http://{gateway}:8080/", check=False)
        assert other.stdout == "hello\n", other.stderr
    finally:
        docker("rm", "-f", "web", check=False)


def test_a_registry_container_on_localhost_5000_takes_pushes_and_pulls(world):
    """Issue #9, 5: a registry on the VM itself is not egress."""
    docker = world.registries.docker
    docker("run", "-d", "--name", "local-registry", "-p", "5000:5000", "local/registry:1")
    try:
        docker("tag", "local/busybox:1", "localhost:5000/test/busybox:1")
        deadline = time.monotonic() + 15
        while (pushed := docker("push", "localhost:5000/test/busybox:1", check=False)).returncode != 0:
            assert time.monotonic() < deadline, pushed.stderr
            time.sleep(0.5)
        docker("rmi", "localhost:5000/test/busybox:1")
        pulled = docker("pull", "localhost:5000/test/busybox:1", check=False)
        assert pulled.returncode == 0, pulled.stderr
    finally:
        docker("rm", "-f", "local-registry", check=False)
        docker("rmi", "localhost:5000/test/busybox:1", check=False)


def test_container_dns_through_the_engines_resolver(world):
    """Issue #9, 5: a user-defined network's containers ask 127.0.0.11, which dockerd serves
    from inside the container's namespace and forwards to the VM's resolver."""
    docker = world.registries.docker
    docker("network", "create", "labnet")
    try:
        result = docker("run", "--rm", "--network", "labnet", "local/busybox:1", "nslookup",
                        "allowed-registry.test", check=False)
        # the A answer; the lab's DNS server refuses AAAA for this name, so nslookup's status is not checked
        assert f"Address: {ALLOWED4}" in result.stdout, result.stdout + result.stderr
    finally:
        docker("network", "rm", "labnet", check=False)


def test_a_container_that_fetches_itself_is_blocked_in_containers_scope_only(world, tmp_path):
    """Issue #9, 5: a buildx docker-container builder (BuildKit in a container), a pull-through
    cache, any container: its own connections are not the engine's. Engine scope alone lets
    them pass (its documented limit); containers scope blocks them. (buildx itself is not in
    Debian 12: a container connecting to the registry stands in for the builder.)"""
    probe = ["run", "--rm", "local/busybox:1", "sh", "-c", f"nc -w 3 {BLOCKED4} 443 </dev/null && echo open || echo closed"]
    assert world.registries.docker(*probe).stdout.strip() == "open", "engine scope alone: not the engine's"
    containers = tmp_path / "containers.toml"
    containers.write_text(Path(world.config).read_text().replace(
        "[enforcement]\n", '[enforcement]\nscope = ["engine", "containers"]\n'))
    restart_daemon(world, str(containers))
    try:
        assert world.registries.docker(*probe).stdout.strip() == "closed"
        # Issue #11, 1: the builder's refusal names its container and image (buildx names a
        # docker-container builder's container buildx_buildkit_<builder>0)
        docker = world.registries.docker
        builder = docker("run", "-d", "--name", "buildx_buildkit_lab0", "local/busybox:1", "sh", "-c",
                         f"while true; do nc -w 1 {BLOCKED4} 443 </dev/null; sleep 1; done").stdout.strip()
        try:
            client = wait_for_client(world, lambda c: c.get("container", {}).get("id") == builder)
            assert client["container"] == {"id": builder, "name": "buildx_buildkit_lab0", "image": "local/busybox:1"}
            assert client["comm"] == "nc" and client["pid"] > 0
            text = world.ramfw("status", "--config", world.config).stdout
            assert f"in container buildx_buildkit_lab0 (local/busybox:1, {builder[:12]})" in text
        finally:
            docker("rm", "-f", builder, check=False)
    finally:
        restart_daemon(world, world.config)


def test_a_cgroup_named_after_a_container_does_not_pin_its_connections_on_it(world, tmp_path):
    """A local user with a delegated cgroup subtree can name a cgroup docker-<id>.scope after a
    real container: the block names that cgroup, not the container (the engine says where the
    container's process runs)."""
    docker = world.registries.docker
    victim = docker("run", "-d", "--name", "victim", "local/busybox:1", "sleep", "300").stdout.strip()
    framing = world.cgroup(f"docker-{victim}.scope")
    host_config = tmp_path / "host.toml"
    host_config.write_text(Path(world.config).read_text().replace(
        "[enforcement]\n", '[enforcement]\nscope = ["engine", "host"]\n'))
    restart_daemon(world, str(host_config))
    try:
        curl = world.vm.popen("curl", "-s", "-o", "/dev/null", "--retry", "3", "--retry-connrefused",
                              "--retry-delay", "1", f"https://{BLOCKED4}/v2/",
                              preexec_fn=lambda: (framing / "cgroup.procs").write_text(str(os.getpid())))
        try:
            client = wait_for_client(world, lambda c: c.get("pid") == curl.pid)
        finally:
            curl.kill()
            curl.wait()
        assert client["container"] == {"id": victim, "name": "", "image": ""}
        text = world.ramfw("status", "--config", world.config).stdout
        assert f"named for container {victim[:12]}, which the engine does not say runs there" in text
        assert "in container victim" not in text
    finally:
        restart_daemon(world, world.config)
        docker("rm", "-f", victim, check=False)


def test_hosts_file_and_hard_coded_addresses_do_not_get_through(world):
    for reference in (f"{HOSTS_FILE_ONLY}/{IMAGE}", f"{BLOCKED4}/{IMAGE}"):
        result, _ = pull(world, reference)
        assert result.returncode != 0 and "connection refused" in result.stderr, result.stderr


def skopeo_in_distribution(world, reference):
    """skopeo in a "distribution" of its own: separate mount and PID namespaces, the VM's network."""
    vm = world.registries.dir / "vm"
    certs = vm / "etc-docker" / "certs.d" / reference.split("/")[0]
    script = (f"mount --bind {vm / 'resolv.conf'} /etc/resolv.conf; exec nsenter --net={world.vm.path} "
              f"skopeo inspect --raw --cert-dir {certs} docker://{reference}")
    return subprocess.run(["unshare", "-m", "-p", "--fork", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60)


def restart_daemon(world, config):
    world.daemon.terminate()
    assert world.daemon.wait(10) == 0
    world.daemon = world.start_daemon(config)


def test_a_client_outside_the_engine_is_untouched_in_engine_scope_and_blocked_in_host_scope(world, tmp_path):
    reference = f"blocked-registry.test/{IMAGE}"
    assert skopeo_in_distribution(world, reference).returncode == 0, "engine scope: skopeo is not the engine"
    host_config = tmp_path / "host.toml"
    host_config.write_text(Path(world.config).read_text().replace(
        "[enforcement]\n", '[enforcement]\nscope = ["engine", "host"]\n'))
    restart_daemon(world, str(host_config))
    try:
        for distribution in range(2):  # two distributions, one daemon for the whole VM
            result = skopeo_in_distribution(world, reference)
            assert result.returncode != 0 and "connection refused" in result.stderr, (distribution, result.stderr)
        allowed = skopeo_in_distribution(world, f"allowed-registry.test/{IMAGE}")
        assert allowed.returncode == 0, allowed.stderr
    finally:
        restart_daemon(world, world.config)


def test_the_engine_stays_marked_while_the_daemon_restarts(world):
    world.daemon.terminate()
    assert world.daemon.wait(10) == 0
    try:
        result, _ = pull(world, f"blocked-registry.test/{IMAGE}")
        assert result.returncode != 0 and "connection refused" in result.stderr, "still marked, still blocked"
    finally:
        world.daemon = world.start_daemon(world.config)
    assert status(world)["engine"]["attached"]
    fresh(world)
    assert pull(world, f"allowed-registry.test/{IMAGE}")[0].returncode == 0


def test_where_engine_scope_cannot_work_blocked_pulls_still_fail_and_status_says_why(world):
    """Issue #9, 4: a daemon that cannot find the engine's cgroups (here: started in a cgroup
    namespace) said "enforcing", exit 0, and every blocked pull succeeded."""
    assert world.ramfw("down", "--config", world.config).returncode == 0  # no mark left from before
    assert world.daemon.wait(10) == 0
    try:
        world.daemon = world.start_daemon(world.config, prefix=("unshare", "--cgroup"))
        assert bpf.attached_ids(str(world.registries.cgroup)) == [], "nothing marks the engine now"
        fresh(world)
        result, _ = pull(world, f"blocked-registry.test/{IMAGE}")
        assert result.returncode != 0 and "connection refused" in result.stderr, result.stderr
        assert pull(world, f"allowed-registry.test/{IMAGE}")[0].returncode == 0
        text = world.ramfw("status", "--config", world.config)
        assert text.returncode == 8 and "NOT as configured" in text.stdout.splitlines()[0]
        assert "cgroup namespace" in text.stdout.splitlines()[0]
    finally:
        world.daemon.terminate()
        world.daemon.wait(10)
        world.daemon = world.start_daemon(world.config)
    assert world.ramfw("status", "--config", world.config).returncode == 0


def test_zz_down_detaches_the_engine_program_and_removes_the_table(world):
    """Runs last in this module: after `ramfw down`, nothing of ramfw filters the engine."""
    result = world.ramfw("down", "--config", world.config)
    assert result.returncode == 0, result.stderr
    assert world.daemon.wait(10) == 0
    assert "ramfw" not in world.vm.run("nft", "list", "tables").stdout  # the engine's own iptables-nft tables stay
    assert not any((Path(world.config).parent / "bpffs" / "ramfw").glob("*"))
    fresh(world)
    result, _ = pull(world, f"blocked-registry.test/{IMAGE}")
    assert result.returncode == 0, "nothing is left to block it: " + result.stderr
