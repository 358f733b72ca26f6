"""Who was blocked (issue #11, part 1): the kernel records the client of every TCP connection
when it connects (a sock_ops program at the root cgroup), and the block event names it: pid,
process name, executable, cgroup, container. A packet no connect() made (a raw socket's) is
said to be unrecorded, never pinned on someone; the recorder goes when its daemon does."""

import contextlib
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ramfw.daemon import clients as naming
from ramfw.kernel import bpf, clients
from tests.integration.test_forged_replies import forged_syn, send_raw
from tests.lab.sandbox import ALLOWED4, BLOCKED4, NET4, VM4


def curl(lab, *, cgroup: Path | None = None) -> subprocess.Popen:
    """curl to the blocked registry from the vm, retrying the refusals for a few seconds (so
    that it still runs when the daemon reads its executable)."""
    return lab.vm.popen("curl", "-s", "-o", "/dev/null", "--retry", "3", "--retry-connrefused", "--retry-delay", "1",
                        "--resolve", f"blocked-registry.test:443:{BLOCKED4}", "https://blocked-registry.test/v2/",
                        preexec_fn=cgroup and (lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))))


def test_a_blocked_curl_is_named_with_its_pid_and_executable(lab, daemon_log):
    client = curl(lab)
    try:
        blocks = daemon_log(lambda b: b["client"].get("pid") == client.pid)
    finally:
        client.kill()
        client.wait()
    assert blocks, f"no block event names curl's pid {client.pid}: {daemon_log()}"
    event = blocks[0]
    assert event["host"] == "blocked-registry.test" and event["address"] == BLOCKED4 and event["port"] == 443
    assert event["destination_names"] == ["blocked-registry.test"] and event["reason"] == "not_allowlisted"
    assert event["transport"] == "tcp"
    assert event["client"]["recorded"] is True
    assert event["client"]["comm"] == "curl" and event["client"]["uid"] == 0
    assert Path(event["client"]["exe"]).name == "curl"
    assert event["message"].endswith(f"by curl (pid {client.pid}, uid 0, {event['client']['exe']}, "
                                     f"cgroup {event['client']['cgroup']})")
    assert "container" not in event["client"]
    status = json.loads(lab.ramfw("status", "--json", "--config", daemon_log.config).stdout)
    assert any(b["client"].get("pid") == client.pid for b in status["recent_blocks"])
    text = lab.ramfw("status", "--config", daemon_log.config).stdout
    assert f"by curl (pid {client.pid}" in text


def test_a_process_in_a_container_cgroup_is_named_with_the_container(lab, daemon_log):
    """The container is read from the cgroup the kernel recorded (docker-<id>.scope); an engine
    that does not answer leaves its name unknown, and the event still goes out."""
    container_id = secrets.token_hex(32)
    cgroup = lab.cgroup(f"docker-{container_id}.scope")
    client = curl(lab, cgroup=cgroup)
    try:
        blocks = daemon_log(lambda b: b["client"].get("pid") == client.pid, wait=10)
    finally:
        client.kill()
        client.wait()
    assert blocks, daemon_log()
    assert blocks[0]["client"]["container"] == {"id": container_id, "name": "", "image": ""}
    assert blocks[0]["client"]["cgroup"] == "/" + cgroup.name
    assert (f"in cgroup /{cgroup.name}, named for container {container_id[:12]}, which the engine does not say "
            "runs there") in blocks[0]["message"]


def test_the_test_process_own_connection_is_named_with_its_own_pid(lab, daemon_log):
    assert lab.connect(BLOCKED4)[0] == "refused"
    blocks = daemon_log(lambda b: b["client"].get("pid") == os.getpid())
    assert blocks and blocks[0]["client"]["comm"] == Path("/proc/self/comm").read_text().strip()


def test_a_forged_syn_is_said_unrecorded_never_pinned_on_a_process(lab, daemon_log):
    with contextlib.suppress(PermissionError):  # refused in the output hook, so
        send_raw(lab.vm, forged_syn(VM4, BLOCKED4, 40123), BLOCKED4)
    blocks = daemon_log()
    assert blocks, "the forged SYN was blocked and named"
    assert blocks[0]["client"] == {"recorded": False, "why": naming.UNRECORDED}
    assert " by " not in blocks[0]["message"]


def test_udp_is_said_unrecorded(lab, daemon_log):
    with lab.vm.inside():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with contextlib.suppress(PermissionError), sock:  # refused in the output hook, so
        sock.sendto(b"quic?", (BLOCKED4, 443))
    blocks = daemon_log()
    assert blocks and blocks[0]["client"] == {"recorded": False, "why": "only TCP connections are recorded"}
    assert blocks[0]["transport"] == "udp"


def attached_recorders() -> set[int]:
    """The sock_ops programs attached at the root cgroup, by id (BPF_PROG_QUERY)."""
    import ctypes

    fd = os.open(bpf.cgroup2_mount(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        ids = (ctypes.c_uint32 * 64)()
        attr = ctypes.create_string_buffer(struct.pack("<IIIIQI", fd, clients.BPF_CGROUP_SOCK_OPS, 0, 0,
                                                       ctypes.addressof(ids), len(ids)).ljust(bpf.ATTR_SIZE, b"\0"))
        bpf.bpf(bpf.BPF_PROG_QUERY, attr)
        return set(ids[:struct.unpack_from("<I", attr, 24)[0]])
    finally:
        os.close(fd)


def test_the_recorder_goes_with_its_daemon_even_when_killed(lab, write_config, write_policy):
    before = attached_recorders()
    write_policy(["allowed-registry.test"])
    daemon = lab.start_daemon(write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n'))
    ours = attached_recorders() - before  # (a recorder of an earlier test's daemon may still be going)
    assert len(ours) == 1, "the daemon attached one recorder"
    daemon.kill()
    daemon.wait()
    assert not ours & attached_recorders(), "the kernel detached it with the daemon's last file descriptor"


def test_an_allowlisted_name_whose_address_expired_is_said_so(lab, write_config, write_policy, tmp_path):
    """Why, not only what: a block of an allowlisted name's address after its lookup expired
    names the name and says the address is not learned now (it did say "no DNS name was seen")."""
    lab.serve_tcp([ALLOWED4], [443])
    lab.start_dnsmasq(NET4, f"--host-record=allowed-registry.test,{ALLOWED4}", ttl=1)
    write_policy(["allowed-registry.test"])
    log_file = tmp_path / "ramfw.log"
    config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\nttl_min = 1\nttl_grace = 0\n', scope=["host"])
    text = Path(config).read_text()
    Path(config).write_text(text.replace("[daemon]\n", f'[daemon]\nlog_file = "{log_file}"\n', 1))
    lab.start_daemon(config, "--log-format", "json")
    lab.resolve("allowed-registry.test")
    assert lab.connect(ALLOWED4)[0] == "connected"
    time.sleep(2.5)
    assert lab.connect(ALLOWED4)[0] == "refused"
    deadline = time.monotonic() + 5
    while True:
        events = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.exists() else []
        blocks = [e for e in events if e["event"] == "block"]
        if blocks or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert blocks, events
    assert blocks[0]["reason"] == "address_not_learned" and blocks[0]["host"] == "allowed-registry.test"
    assert blocks[0]["message"].startswith(f"registry access to allowed-registry.test is not allowed at {ALLOWED4} now "
                                           "(allowlisted, but that address is not learned")


CONNECT_AND_WAIT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print(s.getsockname()[0], s.getsockname()[1], flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("how", ["helpers", "task"])
def test_each_recorder_names_the_process_its_user_and_cgroup(lab, how):
    """Where sock_ops has no helpers for the task (kernels before about 6.16: WSL2's 6.6,
    LinuxKit's 6.12), the recorder reads the task's fields at the offsets the kernel's BTF gives:
    both ways must record the same process, thread, user, group, cgroup and name."""
    lab.serve_tcp([ALLOWED4], [443])
    cgroup = lab.cgroup("client")
    try:
        recorder = clients.ClientRecorder(bpf.cgroup2_mount(), only=how)
    except OSError as err:
        pytest.skip(f"this kernel does not take the {how} recorder: {err}")
    try:
        client = lab.vm.popen("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                              CONNECT_AND_WAIT, ALLOWED4, "443", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, preexec_fn=lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid())))
        try:
            local, port = client.stdout.readline().split()
            connect = recorder.lookup(local, int(port), ALLOWED4, 443)
        finally:
            client.communicate("", timeout=10)
    finally:
        recorder.close()
    assert recorder.how == how and connect is not None
    assert (connect.pid, connect.thread, connect.uid, connect.gid) == (client.pid, client.pid, 65534, 65534)
    assert connect.cgroup_id == cgroup.stat().st_ino
    assert connect.comm == Path(sys.executable).name[:15]
    assert abs(time.clock_gettime_ns(time.CLOCK_BOOTTIME) - connect.boot_ns) < 30e9


def test_connections_are_counted_on_the_ports_asked_and_taken_a_bounded_number_at_a_time(lab):
    lab.vm.run("ip", "addr", "add", "127.0.0.2/8", "dev", "lo", check=False)
    with lab.vm.inside():
        servers = [socket.create_server((address, port)) for address in ("127.0.0.1", "127.0.0.2", "127.0.0.3")
                   for port in (443, 8443)]
    recorder = clients.ClientRecorder(bpf.cgroup2_mount(), count_ports=(443,))
    try:
        for address, port in (("127.0.0.1", 443), ("127.0.0.1", 443), ("127.0.0.1", 8443), ("127.0.0.2", 443),
                              ("127.0.0.3", 443)):
            with lab.vm.inside():
                socket.create_connection((address, port)).close()
        first = recorder.connections(limit=2)
        rest = recorder.connections()
    finally:
        recorder.close()
        for server in servers:
            server.close()
    assert len(first) == 2 and len(rest) == 1
    assert {**first, **rest} == {"127.0.0.1": 2, "127.0.0.2": 1, "127.0.0.3": 1}, "8443 is not counted"


def test_a_kernel_that_refuses_the_helpers_gets_the_task_reader_and_one_that_refuses_both_is_told_why(monkeypatch):
    """Older kernels refuse sock_ops the task helpers: here a helper sock_ops may not call stands
    in for them (the verifier refuses it as an older kernel refuses bpf_get_current_uid_gid)."""
    if bpf.cgroup2_mount() is None or os.geteuid() != 0:
        pytest.skip("needs root and cgroup v2")
    refused_helper = lambda a: a(bpf.CALL, imm=27)  # noqa: E731 - bpf_get_stackid: not for sock_ops
    monkeypatch.setattr(clients, "_who_by_helpers", refused_helper)
    maps = [bpf.map_create(bpf.BPF_MAP_TYPE_LRU_HASH, clients.KEY, clients.VALUE, 16),
            bpf.map_create(bpf.BPF_MAP_TYPE_LRU_HASH, clients.DESTINATION, 8, 16)]
    try:
        fd, how = clients.load_recorder(*maps)
        os.close(fd)
        assert how == "task"
        monkeypatch.setattr(clients.btf, "VMLINUX", Path("/nonexistent/vmlinux"))
        with pytest.raises(OSError) as refused:
            clients.load_recorder(*maps)
        assert "helpers: Invalid argument: program of this type cannot use helper bpf_get_stackid#27" in str(refused.value)
        assert "task: /nonexistent/vmlinux: No such file or directory" in str(refused.value)
        ok, detail = clients.probe()
        assert not ok and detail.startswith("the client recorder does not load (helpers: ")
    finally:
        for fd in maps:
            os.close(fd)
