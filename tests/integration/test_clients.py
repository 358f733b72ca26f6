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
import time
from pathlib import Path

import pytest

from ramfw.kernel import bpf, clients
from tests.integration.test_forged_replies import checksum, send_raw
from tests.lab.sandbox import ALLOWED4, BLOCKED4, NET4, VM4


@pytest.fixture
def daemon_log(lab, write_config, write_policy, tmp_path):
    """A daemon in host scope with a JSON log; returns a reader of its block events."""
    lab.serve_tcp([BLOCKED4], [443])
    lab.start_dnsmasq(NET4, f"--host-record=blocked-registry.test,{BLOCKED4}")
    write_policy(["allowed-registry.test"])
    log_file = tmp_path / "ramfw.log"
    config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n', scope=["host"],
                          engine_socket=str(tmp_path / "no-engine.sock"))
    text = Path(config).read_text()
    Path(config).write_text(text.replace("[daemon]\n", f'[daemon]\nlog_file = "{log_file}"\n', 1))
    daemon = lab.start_daemon(config, "--log-format", "json")
    lab.resolve("blocked-registry.test")

    def blocks(where=lambda block: True, wait: float = 5.0) -> list[dict]:
        deadline = time.monotonic() + wait
        while True:
            events = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.exists() else []
            found = [e for e in events if e["event"] == "block" and where(e)]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)
    blocks.daemon, blocks.config = daemon, config
    return blocks


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
    assert event["message"].endswith(f"by curl (pid {client.pid}, {event['client']['exe']}, "
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


def forged_syn(src: str, dst: str, sport: int, dport: int = 443) -> bytes:
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, 20)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, socket.inet_aton(src),
                       socket.inet_aton(dst)) + tcp


def test_a_forged_syn_is_said_unrecorded_never_pinned_on_a_process(lab, daemon_log):
    with contextlib.suppress(PermissionError):  # refused in the output hook, so
        send_raw(lab.vm, forged_syn(VM4, BLOCKED4, 40123), BLOCKED4)
    blocks = daemon_log()
    assert blocks, "the forged SYN was blocked and named"
    assert blocks[0]["client"] == {"recorded": False, "why": "no connect() recorded for it: a raw socket's or forged "
                                                             "packet, or more than 16384 connections since"}
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
    during = attached_recorders()
    assert len(during - before) == 1, "the daemon attached one recorder"
    daemon.kill()
    daemon.wait()
    assert attached_recorders() == before, "the kernel detached it with the daemon's last file descriptor"


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
