"""The release is in the status: the daemon's own, and this command's when no daemon answers."""

import json

import ramfw
from tests.lab.sandbox import NET4


def test_status_carries_the_daemons_version(lab, write_config, write_policy):
    write_policy(["allowed-registry.test"])
    config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n')
    lab.daemon = lab.start_daemon(config)
    document = json.loads(lab.ramfw("status", "--json", "--config", config).stdout)
    assert document["version"] == document["daemon"]["version"] == ramfw.__version__
    text = lab.ramfw("status", "--config", config).stdout
    assert f"daemon:     running, pid {lab.daemon.pid}, ramfw {ramfw.__version__}" in text
    lab.daemon.kill()
    lab.daemon.wait()
    document = json.loads(lab.ramfw("status", "--json", "--config", config).stdout)
    assert document["daemon"] == {"running": False} and document["version"] == ramfw.__version__
    assert f"not running, ramfw {ramfw.__version__}" in lab.ramfw("status", "--config", config).stdout
