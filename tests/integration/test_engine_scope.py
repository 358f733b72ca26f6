"""Engine scope in the daemon, with stand-in engines: real processes, real cgroups, the real
program and kernel; the engine is a process that runs a trusted executable (this Python, named
in ``engine_executables``) and calls itself ``fakeengine``, as dockerd would be found."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ramfw.kernel import bpf
from tests.integration.test_engine_mark import run_in
from tests.lab.sandbox import BLOCKED4, NET4, RAMFW, ROOT, remove_cgroup

ENGINE = """
import ctypes, sys, time
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME: what /proc/<pid>/comm says
print("ready", flush=True)
time.sleep(3600)
"""


@pytest.fixture
def engine_lab(lab, write_config, write_policy, tmp_path):
    if bpf.cgroup2_mount() is None:
        pytest.skip("no cgroup v2 hierarchy is mounted here")
    lab.serve_tcp([BLOCKED4], [443])
    write_policy(["allowed-registry.test"])
    lab.bpffs = tmp_path / "bpffs"  # a private bpffs: the host's pins are never touched
    lab.config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n', engine_processes=["fakeengine"],
                              engine_executables=[os.path.realpath(sys.executable)], bpffs=str(lab.bpffs))
    try:
        yield lab
    finally:
        if Path(lab.config).exists():
            lab.ramfw("down", "--config", lab.config)
        subprocess.run(["umount", str(lab.bpffs)], capture_output=True)


def start_engine(lab, cgroup, name="fakeengine", executable=sys.executable):
    """A stand-in engine in ``cgroup``, in the vm's network namespace; returns once it runs."""
    proc = lab.vm.popen(executable, "-c", ENGINE, name, stdout=subprocess.PIPE,
                        preexec_fn=lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid())))
    lab.processes.append(proc)
    assert proc.stdout.readline() == b"ready\n"
    return proc


def status(lab):
    result = lab.ramfw("status", "--json", "--config", lab.config)
    return result.returncode, json.loads(result.stdout)


def test_every_cgroup_of_the_engine_is_found_and_marked(engine_lab):
    """Issue #9, 1: dockerd and containerd as two services, two cgroups; discovery left to ramfw."""
    lab = engine_lab
    docker, containerd, user = lab.cgroup("docker.service"), lab.cgroup("containerd.service"), lab.cgroup("user")
    start_engine(lab, docker)
    start_engine(lab, containerd)
    lab.daemon = lab.start_daemon(lab.config)
    code, result = status(lab)
    assert code == 0 and result["engine"]["attached"], result["engine"]
    assert {r["path"] for r in result["engine"]["cgroups"] if r["marked"]} == {str(docker), str(containerd)}
    assert [run_in(lab, c, BLOCKED4) for c in (docker, containerd, user)] == ["refused", "refused", "connected"]


def test_a_process_named_like_the_engine_is_not_marked(engine_lab, tmp_path):
    """Issue #9, 2: a copy of the engine's executable (as a container's own) is not the engine."""
    lab = engine_lab
    impostor = lab.cgroup("impostor")
    copy = tmp_path / "python-copy"
    copy.write_bytes(Path(os.path.realpath(sys.executable)).read_bytes())
    copy.chmod(0o755)
    start_engine(lab, impostor, executable=str(copy))
    lab.daemon = lab.start_daemon(lab.config)
    _, result = status(lab)
    assert result["engine"]["cgroups"] == [] and "runs no trusted engine executable" in result["notes"][-1]
    assert run_in(lab, impostor, BLOCKED4) == "connected"


def test_an_engine_restarted_the_way_systemd_does_is_marked_before_it_can_connect(engine_lab):
    """Issue #9, 3: stop, remove the cgroup, make it again, start: the first connection of the
    new engine is refused, 20 times out of 20 (the old daemon never looked again)."""
    lab = engine_lab
    docker = lab.cgroup("docker.service")
    engine = start_engine(lab, docker)
    lab.daemon = lab.start_daemon(lab.config)
    outcomes = []
    for _ in range(20):
        engine.kill()
        engine.wait()
        remove_cgroup(docker)
        docker.mkdir()
        engine = start_engine(lab, docker)
        outcomes.append(run_in(lab, docker, BLOCKED4))
    assert outcomes == ["refused"] * 20
    code, result = status(lab)
    assert code == 0 and [r["marked"] for r in result["engine"]["cgroups"]] == [True]


def test_where_engine_scope_cannot_work_host_scope_is_in_force_and_status_says_so(engine_lab):
    """Issue #9, 4 and 9: the daemon in a cgroup namespace cannot find the engine's cgroup. It
    said "enforcing" with exit 0 while every blocked pull succeeded; now it fails closed."""
    lab = engine_lab
    docker = lab.cgroup("docker.service")
    start_engine(lab, docker)
    lab.daemon = lab.start_daemon(lab.config, prefix=("unshare", "--cgroup"))
    code, result = status(lab)
    assert code == 8 and "NOT as configured" in result["message"] and "cgroup namespace" in result["message"]
    assert result["scope_in_force"] == ["engine", "host"]
    assert run_in(lab, docker, BLOCKED4) == "refused", "the engine, unmarked, is caught by host scope"
    text = lab.ramfw("status", "--config", lab.config)
    assert text.returncode == 8 and text.stdout.startswith("ramfw is enforcing in enforce mode, but NOT as configured")
    home = lab.cgroup("doctor")
    doctor = subprocess.run(["unshare", "--cgroup", *RAMFW, "doctor"], capture_output=True, text=True, cwd=str(ROOT),
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=lambda: (home / "cgroup.procs").write_text(str(os.getpid())))
    assert "[NO ] cgroup_paths" in doctor.stdout and "--cgroupns host" in doctor.stdout


def test_no_engine_running_is_said_and_is_not_a_gap(engine_lab):
    lab = engine_lab
    lab.daemon = lab.start_daemon(lab.config)
    code, result = status(lab)
    assert code == 0 and any("no engine process (fakeengine) runs" in n for n in result["notes"])
    docker = lab.cgroup("docker.service")
    start_engine(lab, docker)
    deadline = time.monotonic() + 3
    while run_in(lab, docker, BLOCKED4) != "refused":  # found within a second
        assert time.monotonic() < deadline
    assert status(lab)[1]["engine"]["attached"]
