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
from tests.lab.sandbox import ALLOWED4, BLOCKED4, NET4, RAMFW, ROOT, remove_cgroup

ENGINE = """
import ctypes, os, sys, time
os.setuid(int(sys.argv[2]))
ctypes.CDLL(None).prctl(15, bytes.fromhex(sys.argv[1]), 0, 0, 0)  # PR_SET_NAME: what /proc/<pid>/comm says
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


def start_engine(lab, cgroup, name="fakeengine", executable=sys.executable, uid=0):
    """A stand-in engine in ``cgroup``, in the vm's network namespace; returns once it runs."""
    proc = lab.vm.popen(executable, "-c", ENGINE, (name if isinstance(name, bytes) else name.encode()).hex(),
                        str(uid), stdout=subprocess.PIPE,
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


def test_a_root_process_named_like_the_engine_running_another_file_is_not_marked_and_not_trusted(engine_lab,
                                                                                                tmp_path):
    """Issue #9, 2: a copy of the engine's executable (as a container's own, or an engine
    installed where ramfw does not look: snap, k3s, /opt) is not the engine: never marked, never
    moved; and as it may be the real engine, engine scope fails closed until configured."""
    lab = engine_lab
    elsewhere = lab.cgroup("elsewhere")
    copy = tmp_path / "python-copy"
    copy.write_bytes(Path(os.path.realpath(sys.executable)).read_bytes())
    copy.chmod(0o755)
    start_engine(lab, elsewhere, executable=str(copy))
    lab.daemon = lab.start_daemon(lab.config)
    code, result = status(lab)
    assert code == 8 and result["engine"]["cgroups"] == [] and "engine_executables" in result["message"]
    assert run_in(lab, elsewhere, BLOCKED4) == "refused", "caught by host scope, not by a mark"
    assert run_in(lab, lab.cgroup("user"), BLOCKED4) == "refused"
    # Configured, as docs/linuxkit.md says for an engine ramfw cannot verify: marked, scope as configured.
    lab.daemon.terminate()
    lab.daemon.wait(10)
    Path(lab.config).write_text(Path(lab.config).read_text().replace(
        "[enforcement]\n", f'[enforcement]\nengine_cgroups = ["{elsewhere}"]\n'))
    lab.daemon = lab.start_daemon(lab.config)
    code, result = status(lab)
    assert code == 0 and [(r["path"], r["marked"]) for r in result["engine"]["cgroups"]] == [(str(elsewhere), True)]
    assert run_in(lab, lab.cgroup("user2"), BLOCKED4) == "connected"


def test_an_unprivileged_user_running_the_engine_file_changes_nothing(engine_lab):
    """Anyone may run /usr/bin/containerd: as another uid it neither gets its cgroup marked
    nor puts host scope in force."""
    lab = engine_lab
    shared = lab.cgroup("cron.service")
    start_engine(lab, shared, uid=65534)
    lab.daemon = lab.start_daemon(lab.config)
    code, result = status(lab)
    assert code == 0 and result["engine"]["cgroups"] == [] and result["scope_in_force"] == ["engine"]
    assert any("uid 65534" in note for note in result["notes"])
    assert run_in(lab, shared, BLOCKED4) == "connected"


def test_a_process_named_with_any_bytes_does_not_blind_discovery(engine_lab):
    """prctl(PR_SET_NAME) takes any bytes and no privilege: a name that is not UTF-8 made every
    check raise, at start (no ruleset at all) and after (a restarted engine stayed unmarked)."""
    lab = engine_lab
    start_engine(lab, lab.cgroup("poison"), name=b"\xff\xfe", uid=65534)
    docker = lab.cgroup("docker.service")
    engine = start_engine(lab, docker)
    lab.daemon = lab.start_daemon(lab.config)
    engine.kill()
    engine.wait()
    remove_cgroup(docker)
    docker.mkdir()
    start_engine(lab, docker)
    assert run_in(lab, docker, BLOCKED4) == "refused"
    code, result = status(lab)
    assert code == 0 and [r["marked"] for r in result["engine"]["cgroups"]] == [True], result["errors"]


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
    doctor = subprocess.run(["unshare", "--cgroup", *RAMFW, "doctor", "--config", lab.config], capture_output=True,
                            text=True, cwd=str(ROOT),
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


def test_up_without_a_daemon_marks_the_engine_and_status_says_when_that_no_longer_holds(engine_lab):
    """`ramfw up` alone marked nothing in engine scope, and status said "enforcing", exit 0."""
    lab = engine_lab
    docker = lab.cgroup("docker.service")
    engine = start_engine(lab, docker)
    assert lab.ramfw("up", "--config", lab.config).returncode == 0
    assert run_in(lab, docker, BLOCKED4) == "refused"
    assert lab.ramfw("status", "--config", lab.config).returncode == 0
    engine.kill()
    engine.wait()
    remove_cgroup(docker)
    docker.mkdir()
    start_engine(lab, docker)  # restarted, and no daemon follows it
    result = lab.ramfw("status", "--config", lab.config)
    assert result.returncode == 8 and f"engine cgroup {docker} is not marked" in result.stdout.splitlines()[0]


def test_where_no_cgroup_v2_is_visible_the_daemon_mounts_its_own(engine_lab):
    """Issue #9, 4: started where /sys shows no cgroup v2 (as under `ip netns exec`), the daemon
    logged one INFO line and marked nothing; it mounts the hierarchy itself and marks the engine."""
    lab = engine_lab
    docker = lab.cgroup("docker.service")
    start_engine(lab, docker)
    hide = f'umount -l {bpf.cgroup2_mount()} && exec "$@"'
    lab.daemon = lab.start_daemon(lab.config, prefix=("unshare", "-m", "--propagation", "private",
                                                      "sh", "-c", hide, "sh"))
    code, result = status(lab)
    assert code == 0 and [Path(r["path"]).name for r in result["engine"]["cgroups"] if r["marked"]] == [docker.name]
    assert "/cgroup2/" in result["engine"]["cgroups"][0]["path"]
    assert run_in(lab, docker, BLOCKED4) == "refused"


def unit_bounding_set() -> list[str]:
    unit = (ROOT / "scripts" / "ramfw.service").read_text()
    line = next(line for line in unit.splitlines() if line.startswith("CapabilityBoundingSet="))
    return line.split("=", 1)[1].split()


def test_the_daemon_works_within_the_units_capability_bounding_set(engine_lab):
    """Issue #10: the unit's CapabilityBoundingSet is all the daemon needs: the probes, the table
    and queue, the engine found (its /proc/<pid>/exe) and marked, a reply learned, a blocked
    connection refused. The daemon runs with that bounding set and nothing more (checked)."""
    lab = engine_lab
    lab.start_dnsmasq(NET4, f"--host-record=allowed-registry.test,{ALLOWED4}")
    caps = unit_bounding_set()
    docker = lab.cgroup("docker.service")
    start_engine(lab, docker)
    wanted = ",".join("+" + cap.lower().removeprefix("cap_") for cap in caps)
    lab.daemon = lab.start_daemon(lab.config, prefix=("setpriv", f"--bounding-set=-all,{wanted}", "--"))
    def bounding_set(pid):
        return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("CapBnd:")).split()[1], 16)

    numbers = {name: number for number, name in enumerate(CAPABILITY_NAMES)}
    # what the unit allows, less what this machine never gives (CAP_SYS_RESOURCE, in some sandboxes)
    assert bounding_set(lab.daemon.pid) == sum(1 << numbers[cap] for cap in caps) & bounding_set("self")
    code, result = status(lab)
    assert code == 0 and result["engine"]["attached"], result
    assert [r["path"] for r in result["engine"]["cgroups"] if r["marked"]] == [str(docker)]
    assert run_in(lab, docker, BLOCKED4) == "refused"
    lab.resolve("allowed-registry.test")
    assert "allowed-registry.test" in status(lab)[1]["learned"]


CAPABILITY_NAMES = (  # linux/capability.h, in order
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE")
