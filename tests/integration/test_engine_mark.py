"""Engine scope: the sock_create program marks the sockets of the engine's cgroups' processes
only, and whether a cgroup is marked is what the kernel says."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ramfw.kernel import bpf, engine
from tests.lab.sandbox import ALLOWED4, BLOCKED4

MARK = 0x52410000
CONNECT = """
import socket, sys
s = socket.socket()
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("connected")
except ConnectionRefusedError:
    print("refused")
"""


@pytest.fixture
def cgroup():
    mount = bpf.cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup v2 hierarchy is mounted here")
    try:
        fd = bpf.load_program(engine.mark_program(MARK), bpf.BPF_PROG_TYPE_CGROUP_SOCK,
                              bpf.BPF_CGROUP_INET_SOCK_CREATE)
        os.close(fd)
    except OSError as err:
        pytest.skip(f"cgroup socket programs cannot be loaded here: {err}")
    path = Path(mount) / f"ramfw-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        for pid in (path / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        path.rmdir()


def run_in(lab, cgroup, address, port=443):
    """A process in the vm's network namespace, optionally placed in ``cgroup`` before exec."""
    def enter():
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    result = subprocess.run(["nsenter", f"--net={lab.vm.path}", sys.executable, "-c", CONNECT, address, str(port)],
                            capture_output=True, text=True, preexec_fn=enter, timeout=10)
    return result.stdout.strip()


def test_hand_assembled_program_marks_only_the_engine_cgroup(lab, write_config, tmp_path, cgroup):
    lab.serve_tcp([ALLOWED4, BLOCKED4], [443])
    assert lab.ramfw("up", "--config", write_config()).returncode == 0
    bpffs = tmp_path / "bpffs"  # a private bpffs, unmounted after: the host's is not touched
    engine_mark = engine.EngineMark(MARK, bpffs=bpffs, state_file=tmp_path / "engine.cgroup")
    try:
        engine_mark.load()
        assert engine_mark.attach(str(cgroup)) and not engine_mark.attach(str(cgroup))
        assert run_in(lab, cgroup, BLOCKED4) == "refused", "the engine's sockets are marked and filtered"
        assert run_in(lab, None, BLOCKED4) == "connected", "other processes are untouched"
        engine_mark.load()  # a restart: new program attached before the old one is detached
        assert engine_mark.attached(str(cgroup)) and bpf.attached_ids(str(cgroup)) == [engine_mark.program_id]
        assert run_in(lab, cgroup, BLOCKED4) == "refused"
    finally:
        engine_mark.remove()
        engine_mark.remove()
        subprocess.run(["umount", str(bpffs)], check=False)
    assert run_in(lab, cgroup, BLOCKED4) == "connected", "detached cleanly"


def test_bcc_loader_marks_the_same_way(lab, write_config, tmp_path, cgroup, bcc_headers):
    lab.serve_tcp([BLOCKED4], [443])
    assert lab.ramfw("up", "--config", write_config()).returncode == 0
    bpffs = tmp_path / "bpffs"
    engine_mark = engine.EngineMark(MARK, bpffs=bpffs, state_file=tmp_path / "engine.cgroup", use_bcc=True)
    try:
        engine_mark.load()
        engine_mark.attach(str(cgroup))
        assert run_in(lab, cgroup, BLOCKED4) == "refused"
        assert run_in(lab, None, BLOCKED4) == "connected"
    finally:
        engine_mark.remove()
        subprocess.run(["umount", str(bpffs)], check=False)
    assert run_in(lab, cgroup, BLOCKED4) == "connected"


def test_every_engine_cgroup_is_marked_and_a_cgroup_made_again_is_not_until_marked_again(lab, write_config,
                                                                                          tmp_path, cgroup):
    """Issue #9, 1 and 3: dockerd and containerd in two cgroups, both marked; and systemd's
    restart (remove the cgroup, make it again) leaves the new one unmarked, which the kernel
    says (BPF_PROG_QUERY) rather than a flag set once."""
    lab.serve_tcp([BLOCKED4], [443])
    assert lab.ramfw("up", "--config", write_config()).returncode == 0
    second = lab.cgroup("containerd")
    bpffs = tmp_path / "bpffs"
    engine_mark = engine.EngineMark(MARK, bpffs=bpffs, state_file=tmp_path / "engine.cgroup")
    try:
        engine_mark.load()
        for path in (cgroup, second):
            engine_mark.attach(str(path))
        assert [run_in(lab, path, BLOCKED4) for path in (cgroup, second)] == ["refused", "refused"]
        second.rmdir()
        second.mkdir()  # as systemd does on `systemctl restart containerd`
        assert not engine_mark.attached(str(second))
        assert run_in(lab, second, BLOCKED4) == "connected", "the made-again cgroup lost the program"
        assert engine_mark.attach(str(second)) and run_in(lab, second, BLOCKED4) == "refused"
        assert sorted(engine_mark.cgroups()) == sorted([str(cgroup), str(second)])
    finally:
        engine_mark.remove()
        subprocess.run(["umount", str(bpffs)], check=False)
    assert bpf.attached_ids(str(second)) == [] and bpf.attached_ids(str(cgroup)) == []
