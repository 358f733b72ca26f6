"""The image for LinuxKit-style VMs, run by a real engine as docs/linuxkit.md says, enforcing.

scripts/build-image makes ramfw:<version> from Debian's packages (no registry) and imports it
into the lab's engine (DOCKER_HOST). That engine runs it as a LinuxKit service entry would:
the VM's network, PID and cgroup namespaces, only the documented capabilities, the documented
binds; the engine's cgroups named in the configuration, as docs/linuxkit.md tells (ramfw cannot
verify a dockerd that runs a file of another image). Then that engine's pulls go through it.
"""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

import ramfw
from ramfw import config as config_mod
from ramfw.daemon.control import answers
from ramfw.kernel import bpf
from tests.lab.registry import IMAGE, RegistryLab, tools_missing
from tests.lab.sandbox import NET4, ROOT, Lab, skip_reason

# docs/linuxkit.md's service entry, less CAP_BPF, which Debian 12's engine (20.10) does not know:
# CAP_SYS_ADMIN covers bpf() too. Nothing else: every default capability is dropped.
CAPABILITIES = ["NET_ADMIN", "SYS_ADMIN"]


@pytest.fixture(scope="module")
def image_world(tmp_path_factory):
    reason = skip_reason() or tools_missing()
    mount = bpf.cgroup2_mount()
    if reason is None and mount is None:
        reason = "no cgroup v2 hierarchy is mounted"
    if reason is None and subprocess.run(["which", "mmdebstrap"], capture_output=True).returncode != 0 \
            and subprocess.run(["apt-cache", "policy", "mmdebstrap"], capture_output=True, text=True).stdout.find(
                "Candidate: (none)") != -1:
        reason = "mmdebstrap is not available from Debian here"
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("image")
    lab = Lab()
    registries = None
    name = f"ramfw-e2e-{os.getpid()}"
    try:
        registries = RegistryLab(lab, tmp / "registries")
        docker_cgroup, containerd_cgroup = registries.start_engine()
        registries.host_network()
        built = subprocess.run([str(ROOT / "scripts" / "build-image"), str(tmp / "dist")], capture_output=True,
                               text=True, env={**os.environ, "DOCKER_HOST": f"unix://{registries.socket}"})
        assert built.returncode == 0 and f"imported as ramfw:{ramfw.__version__}" in built.stderr, built.stderr[-3000:]
        etc = tmp / "etc-ramfw"
        etc.mkdir()
        (etc / "policy.json").write_text(json.dumps({"organizations": [{"name": "acme", "registryAccess": {
            "registries": [{"address": "allowed-registry.test"}]}}]}))
        cgroups = [f"/{Path(c).relative_to(mount)}" for c in (docker_cgroup, containerd_cgroup)]
        (etc / "ramfw.toml").write_text(
            f'[enforcement]\nengine_processes = ["ramfw-test-no-engine"]\nengine_cgroups = {json.dumps(cgroups)}\n'
            f'[dns]\ntrusted_resolvers = ["{NET4}"]\n')
        run, bpffs = tmp / "run", tmp / "bpffs"
        run.mkdir()
        bpffs.mkdir()
        # the CLI outside the container reaches the daemon through the shared run directory
        lab.config = str(tmp / "host.toml")
        Path(lab.config).write_text(f'[daemon]\nrun_dir = "{run}"\n')
        lab.registries, lab.name = registries, name
        started = registries.docker(
            "run", "-d", "--name", name, "--net", "host", "--pid", "host", "--cgroupns", "host",
            "--cap-drop", "ALL", *[f"--cap-add={cap}" for cap in CAPABILITIES],
            "-v", f"{mount}:/sys/fs/cgroup", "-v", f"{bpffs}:/sys/fs/bpf", "-v", f"{run}:/run/ramfw",
            "-v", f"{etc}:/etc/ramfw:ro", f"ramfw:{ramfw.__version__}", check=False)
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + 60
        while not answers(config_mod.load(lab.config)):
            state = registries.docker("inspect", "-f", "{{.State.Running}}", name, check=False).stdout.strip()
            logs = registries.docker("logs", name, check=False)
            assert state == "true", f"the container stopped: {logs.stdout[-2000:]}{logs.stderr[-2000:]}"
            assert time.monotonic() < deadline, f"no answer within 60 s: {logs.stderr[-2000:]}"
            time.sleep(0.2)
        yield lab
    finally:
        try:
            if registries is not None:
                registries.docker("rm", "-f", name, check=False)
                registries.close()
        finally:
            lab.close()


def status(world):
    result = world.ramfw("status", "--json", "--config", world.config)
    return result.returncode, json.loads(result.stdout)


def test_the_image_runs_the_daemon_of_this_release_marking_the_engine(image_world):
    code, result = status(image_world)
    assert code == 0, result["message"]
    assert result["version"] == ramfw.__version__ and result["enforcing"]
    assert result["scope_in_force"] == ["engine"] and all(row["marked"] for row in result["engine"]["cgroups"])
    assert len(result["engine"]["cgroups"]) == 2
    inspect = image_world.registries.docker("inspect", "-f", "{{json .Config.Cmd}}", f"ramfw:{ramfw.__version__}")
    assert json.loads(inspect.stdout) == ["/usr/bin/ramfw", "daemon", "--config", "/etc/ramfw/ramfw.toml"]


def test_the_engine_beside_it_pulls_the_allowed_registry_and_is_refused_the_blocked_one(image_world):
    docker = image_world.registries.docker
    allowed = docker("pull", f"allowed-registry.test/{IMAGE}", check=False)
    assert allowed.returncode == 0, allowed.stderr
    start = time.monotonic()
    blocked = docker("pull", f"blocked-registry.test/{IMAGE}", check=False)
    assert blocked.returncode != 0 and "connection refused" in blocked.stderr, blocked.stderr
    assert time.monotonic() - start < 1.5
    deadline = time.monotonic() + 5
    while not any(b["message"] == "registry access to blocked-registry.test is not allowed"
                  for b in status(image_world)[1]["recent_blocks"]):
        assert time.monotonic() < deadline, status(image_world)[1]["recent_blocks"]
        time.sleep(0.1)
