"""Start-up failures are one or two lines that name the cause and the fix, with their own exit code."""

from ramfw.kernel.nflog import Log
from ramfw.kernel.queue import Queue


def _fails_plainly(lab, config) -> str:
    result = lab.ramfw("daemon", "--config", config)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 7, result.stderr
    assert len(lines) <= 2 and "Traceback" not in result.stderr, result.stderr
    return lines[-1]


def test_a_queue_held_by_another_program_is_named_with_the_setting_to_change(lab, write_config, write_policy):
    write_policy(["allowed-registry.test"])
    config = write_config()
    with lab.vm.inside():
        squatter = Queue(5241)  # as Suricata would hold it
    try:
        line = _fails_plainly(lab, config)
        assert "netfilter queue 5241" in line and "dns.queue_num" in line
    finally:
        squatter.close()


def test_a_log_group_held_by_another_program_is_named_with_the_setting_to_change(lab, write_config, write_policy):
    write_policy(["allowed-registry.test"])
    config = write_config()
    with lab.vm.inside():
        squatter = Log(5241)  # as ulogd would hold the block log group
    try:
        line = _fails_plainly(lab, config)
        assert "NFLOG group 5241" in line and "enforcement.nflog_group" in line
    finally:
        squatter.close()



def test_probes_are_cached_for_this_kernel_and_boot_and_doctor_probes_again(tmp_path, monkeypatch):
    """Issue #10, 7: every start ran every probe (a namespace, iptables-nft, a bcc compile)."""
    import json
    import os

    import pytest

    from ramfw.kernel import probes

    if os.geteuid() != 0:
        pytest.skip("probing needs root")
    cache = tmp_path / "probes.json"
    first = probes.run(cache)
    calls = []
    monkeypatch.setattr(probes, "_probe", lambda: calls.append(1) or first)
    assert probes.run(cache) == first and calls == []
    assert probes.run(cache, fresh=True) == first and calls == [1]  # doctor
    saved = json.loads(cache.read_text())
    saved["key"]["boot_id"] = "another boot"
    cache.write_text(json.dumps(saved))
    probes.run(cache)
    assert calls == [1, 1], "another boot, or kernel, probes again"
