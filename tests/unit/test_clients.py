"""Naming a blocked packet's client (issue #11, part 1), the pure parts: the text a block says,
what a process can make it say, a container only where the engine says so, pid reuse."""

import os
import time

from ramfw.daemon import clients
from ramfw.daemon.blocks import client_text, process_name
from ramfw.kernel import clients as kernel_clients

DOCKERD = {"recorded": True, "pid": 812, "comm": "dockerd", "uid": 0, "exe": "/usr/sbin/dockerd",
           "cgroup": "/system.slice/docker.service"}
ID = "1f2e3d4c5b6a" + "0" * 52


def in_container(name="", image="", cgroup=f"/system.slice/docker-{ID}.scope"):
    return {"recorded": True, "pid": 91, "comm": "nc", "uid": 0, "exe": "", "cgroup": cgroup,
            "container": {"id": ID, "name": name, "image": image}}


def test_the_text_names_the_process_its_executable_and_cgroup():
    assert client_text(DOCKERD) == "dockerd (pid 812, /usr/sbin/dockerd, cgroup /system.slice/docker.service)"
    assert process_name(DOCKERD) == "dockerd" and process_name({"recorded": False, "why": "x"}) == ""


def test_a_container_is_named_only_where_the_engine_says_its_process_runs():
    client = in_container()
    clients._fill(client, {"name": "builder", "image": "moby/buildkit", "cgroup": f"/system.slice/docker-{ID}.scope"})
    assert client_text(client) == "nc (pid 91) in container builder (moby/buildkit, 1f2e3d4c5b6a)"
    assert process_name(client) == "nc in builder"
    framed = in_container(cgroup=f"/user.slice/user-1000.slice/user@1000.service/docker-{ID}.scope")
    clients._fill(framed, {"name": "builder", "image": "moby/buildkit", "cgroup": f"/system.slice/docker-{ID}.scope"})
    assert framed["container"]["name"] == "" and "which the engine does not say runs there" in client_text(framed)
    assert process_name(framed) == "nc"
    nested = in_container(cgroup=f"/system.slice/docker-{ID}.scope/init")
    clients._fill(nested, {"name": "builder", "image": "moby/buildkit", "cgroup": f"/system.slice/docker-{ID}.scope"})
    assert nested["container"]["name"] == "builder"
    sibling = in_container(cgroup=f"/system.slice/docker-{ID}.scope-x")
    clients._fill(sibling, {"name": "builder", "image": "i", "cgroup": f"/system.slice/docker-{ID}.scope"})
    assert sibling["container"]["name"] == ""


def test_container_ids_are_read_from_both_cgroup_drivers_paths():
    for path in (f"/system.slice/docker-{ID}.scope", f"/docker/{ID}", f"/kubepods/pod1/cri-containerd-{ID}.scope"):
        assert clients._CONTAINER.search(path).group(1) == ID, path
    assert clients._CONTAINER.search("/system.slice/docker.service") is None


def test_a_process_cannot_write_log_lines_of_its_own_through_its_name():
    assert clients.printable("x\nWARNING ramfw: allowed") == "x?WARNING ramfw: allowed"
    assert clients.printable("/tmp/a\rb\x1b[2J") == "/tmp/a?b?[2J"


def test_the_executable_is_read_only_while_the_pid_is_the_process_that_connected():
    now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    assert clients.executable(os.getpid(), now) == os.readlink("/proc/self/exe")
    assert clients.executable(os.getpid(), 0) == "", "a process started after the connect is another"
    assert clients.executable(2 ** 22 + 1, now) == ""


def test_a_cgroup_is_found_by_its_id_and_the_walk_is_bounded(tmp_path, monkeypatch):
    (tmp_path / "system.slice" / "docker.service").mkdir(parents=True)
    wanted = (tmp_path / "system.slice" / "docker.service").stat().st_ino
    assert clients.find_cgroup(str(tmp_path), wanted) == "/system.slice/docker.service"
    assert clients.find_cgroup(str(tmp_path), 1) == "/"
    monkeypatch.setattr(clients, "MAX_CGROUPS", 1)
    assert clients.find_cgroup(str(tmp_path), wanted) == ""


def test_the_key_is_the_programs_layout():
    key = kernel_clients.key("192.0.2.1", 40000, "203.0.113.20", 443)
    assert len(key) == kernel_clients.KEY
    assert key[:8] == (2).to_bytes(4, "little") + bytes(4)
    assert key[8:12] == bytes([203, 0, 113, 20]) and key[12:24] == bytes(12)
    assert key[24:28] == bytes([192, 0, 2, 1])
    assert key[40:44] == bytes([0, 0, 0x01, 0xBB]), "the remote port: network order in the upper half"
    assert key[44:48] == (40000).to_bytes(4, "little")
    assert kernel_clients.destination_key("2001:db8::") != kernel_clients.destination_key("32.1.13.184")

