"""Finding the engine's cgroup, on a fake /proc and a fake cgroup2 mount."""

from ramfw.kernel import engine

HYBRID = "12:pids:/system.slice/docker.service\n1:name=systemd:/system.slice/docker.service\n0::/system.slice/docker.service\n"


def fake_proc(tmp_path, processes):
    proc = tmp_path / "proc"
    proc.mkdir()
    for pid, (comm, cgroup) in processes.items():
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "comm").write_text(comm + "\n")
        (proc / str(pid) / "cgroup").write_text(cgroup)
    (proc / "self").mkdir()
    return proc


def test_v2_path_reads_the_unified_line_of_hybrid_layouts():
    assert engine.v2_path(HYBRID) == "/system.slice/docker.service"
    assert engine.v2_path("0::/\n") == "/"
    assert engine.v2_path("4:memory:/x\n") is None


def test_the_engine_service_cgroup_is_found(tmp_path):
    proc = fake_proc(tmp_path, {10: ("dockerd", HYBRID), 11: ("containerd", HYBRID), 12: ("bash", "0::/user\n")})
    found = engine.locate("/sys/fs/cgroup/unified", "", ("dockerd", "containerd"), False, proc)
    assert found.path == "/sys/fs/cgroup/unified/system.slice/docker.service"
    assert found.pids == (10, 11) and not found.note


def test_a_configured_cgroup_wins(tmp_path):
    found = engine.locate("/sys/fs/cgroup", "/system.slice/podman.service", ("dockerd",), False, tmp_path)
    assert found.path == "/sys/fs/cgroup/system.slice/podman.service"


def test_no_engine_yet(tmp_path):
    assert engine.locate("/sys/fs/cgroup", "", ("dockerd",), False, fake_proc(tmp_path, {})) is None


def test_an_engine_in_the_root_cgroup_is_reported_not_marked(tmp_path):
    proc = fake_proc(tmp_path, {20: ("dockerd", "0::/\n")})
    found = engine.locate(str(tmp_path / "cg"), "", ("dockerd",), False, proc)
    assert found.path == str(tmp_path / "cg") and "root cgroup" in found.note


def test_a_dedicated_cgroup_is_made_when_allowed(tmp_path):
    proc = fake_proc(tmp_path, {20: ("dockerd", "0::/\n")})
    mount = tmp_path / "cg"
    mount.mkdir()
    found = engine.locate(str(mount), "", ("dockerd",), True, proc)
    assert found.path == str(mount / "ramfw-engine") and "moved the engine" in found.note
    assert (mount / "ramfw-engine" / "cgroup.procs").read_text() == "20"
