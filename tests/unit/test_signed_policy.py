"""Signed policies (issue #12): real minisign signatures, verified by ramfw; versions, expiry,
the rollback floor; the configuration's rules for sources and keys."""

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from ramfw import config as config_mod
from ramfw.errors import ConfigError, PolicyError
from ramfw.policy import signature, source, trust
from tests.support.signing import Signer, policy_text

pytestmark = pytest.mark.skipif(shutil.which("minisign") is None, reason="minisign is not installed (scripts/setup)")
NOW = 1_800_000_000.0


@pytest.fixture
def keys(tmp_path):
    return Signer(tmp_path, "old"), Signer(tmp_path, "new")


def settings(mode="require", keys=(), **more):
    return config_mod.PolicySettings(signatures=mode, trusted_keys=tuple(keys), **more)


def signed(tmp_path, signer, text, name="policy.json", legacy=False):
    path = tmp_path / name
    path.write_text(text)
    return path.read_bytes(), signer.sign(path, legacy).read_text()


def test_the_key_id_is_minisigns(keys):
    assert signature.parse_public_key(keys[0].pub.read_text()).key_id == keys[0].key_id
    assert signature.parse_public_key(keys[0].line).key_id == keys[0].key_id


@pytest.mark.parametrize("legacy", [False, True])
def test_a_good_signature_names_its_signer(tmp_path, keys, legacy):
    data, sig = signed(tmp_path, keys[0], policy_text(version=1), legacy=legacy)
    policy = trust.accept(data, sig, settings(keys=[keys[0].line]), trust.Floor(), NOW, "p")
    assert policy.signer == keys[0].key_id and policy.version == 1


def test_a_changed_policy_does_not_verify(tmp_path, keys):
    data, sig = signed(tmp_path, keys[0], policy_text(version=1))
    wider = data.replace(b'"ghcr.io"', b'"evil.test"')
    with pytest.raises(signature.SignatureError, match="does not verify"):
        trust.accept(wider, sig, settings(keys=[keys[0].line]), trust.Floor(), NOW, "p")


def test_a_changed_trusted_comment_does_not_verify(tmp_path, keys):
    data, sig = signed(tmp_path, keys[0], policy_text(version=1))
    lines = sig.splitlines()
    lines[2] += " (edited)"
    with pytest.raises(signature.SignatureError, match="does not verify"):
        trust.accept(data, "\n".join(lines), settings(keys=[keys[0].line]), trust.Floor(), NOW, "p")


def test_a_signature_by_a_key_not_trusted_is_refused(tmp_path, keys):
    data, sig = signed(tmp_path, keys[1], policy_text(version=1))
    with pytest.raises(signature.SignatureError, match=f"signed by key {keys[1].key_id}, which is not trusted"):
        trust.accept(data, sig, settings(keys=[keys[0].line]), trust.Floor(), NOW, "p")


def test_rotation_two_keys_trusted_either_verifies(tmp_path, keys):
    both = settings(keys=[keys[0].line, str(keys[1].pub)])  # a key line, and a .pub file's path
    for signer in keys:
        data, sig = signed(tmp_path, signer, policy_text(version=1))
        assert trust.accept(data, sig, both, trust.Floor(), NOW, "p").signer == signer.key_id
    # the old key dropped after the roll: its signatures are refused
    data, sig = signed(tmp_path, keys[0], policy_text(version=2))
    with pytest.raises(signature.SignatureError):
        trust.accept(data, sig, settings(keys=[str(keys[1].pub)]), trust.Floor(), NOW, "p")


def test_modes_unsigned_or_garbled(tmp_path, keys):
    data = policy_text(version=1).encode()
    with pytest.raises(signature.SignatureError, match="no signature"):
        trust.accept(data, None, settings(keys=[keys[0].line]), trust.Floor(), NOW, "p")
    with pytest.raises(signature.SignatureError, match="not a minisign signature"):
        trust.accept(data, "garbage", settings(keys=[keys[0].line]), trust.Floor(), NOW, "p")
    warned = trust.accept(data, None, settings("warn", keys=[keys[0].line]), trust.Floor(), NOW, "p")
    assert warned.signer == "" and any("accepted all the same" in n for n in warned.notes)
    assert trust.accept(data, "garbage", settings("off"), trust.Floor(), NOW, "p").signer == ""


def test_rollback_is_refused_and_the_same_version_must_be_the_same_policy(tmp_path, keys):
    s = settings(keys=[keys[0].line])
    data5, sig5 = signed(tmp_path, keys[0], policy_text(version=5), "v5.json")
    floor = trust.Floor(5, trust.digest(data5))
    assert trust.accept(data5, sig5, s, floor, NOW, "p").version == 5
    data4, sig4 = signed(tmp_path, keys[0], policy_text(("ghcr.io", "evil.test"), version=4), "v4.json")
    with pytest.raises(trust.RollbackError, match="older than version 5"):
        trust.accept(data4, sig4, s, floor, NOW, "p")
    other5, osig5 = signed(tmp_path, keys[0], policy_text(("quay.io",), version=5), "o5.json")
    with pytest.raises(trust.RollbackError, match="publish the change as version 6"):
        trust.accept(other5, osig5, s, floor, NOW, "p")
    unversioned = policy_text().encode()  # version 0: older than anything versioned
    with pytest.raises(trust.RollbackError):
        trust.accept(unversioned, None, settings("off"), floor, NOW, "p")


def test_expired_policies_are_refused_but_the_last_good_one_stays(tmp_path, keys):
    s = settings(keys=[keys[0].line])
    data, sig = signed(tmp_path, keys[0], policy_text(version=3, expires="2027-01-01T00:00:00Z"))
    expires = 1798761600.0
    assert trust.accept(data, sig, s, trust.Floor(), expires - 1, "p").expires == expires
    with pytest.raises(trust.ExpiredError, match="expired at 2027-01-01T00:00:00Z"):
        trust.accept(data, sig, s, trust.Floor(), expires, "p")
    kept = trust.accept(data, sig, s, trust.Floor(), expires + 10, "p", last_good=True)
    assert "expired" in trust.expired(kept, expires + 10) and not trust.expired(kept, expires - 1)


@pytest.mark.parametrize("top, message", [({"version": 0}, "positive whole number"),
                                          ({"version": "7"}, "positive whole number"),
                                          ({"version": True}, "positive whole number"),
                                          ({"expires": "2027-01-01"}, "time zone"),
                                          ({"expires": 5}, "must be a string")])
def test_version_and_expires_are_validated(top, message):
    from ramfw import policy

    with pytest.raises(PolicyError, match=message):
        policy.from_text(policy_text(**top))


def test_load_a_signed_file_source_caches_it_and_raises_the_floor(tmp_path, keys):
    src, cache = tmp_path / "src.json", tmp_path / "cache" / "policy.json"
    cfg = config_mod.Config(policy=settings(keys=[keys[0].line], source=str(src), cache=str(cache)))
    src.write_text(policy_text(version=2))
    keys[0].sign(src)
    policy, where = source.load(cfg)
    assert (policy.version, policy.signer, where) == (2, keys[0].key_id, str(src))
    assert source.read_floor(cache).version == 2 and Path(str(cache) + ".minisig").exists()
    # a replayed older file is refused by a reload; at start the cached version 2 stays
    src.write_text(policy_text(("ghcr.io", "evil.test"), version=1))
    keys[0].sign(src)
    with pytest.raises(trust.RollbackError):
        source.load(cfg)
    policy, where = source.load(cfg, fallback=True)
    assert policy.version == 2 and "last good copy" in where and "older than version 2" in where
    # a badly signed one too
    src.write_text(policy_text(("ghcr.io", "evil.test"), version=3))
    with pytest.raises(signature.SignatureError):
        source.load(cfg)
    # the cached copy itself is checked: signed by a key no longer trusted, it gives way to Docker Hub only
    cfg2 = replace(cfg, policy=replace(cfg.policy, trusted_keys=(keys[1].line,)))
    policy, where = source.load(cfg2, fallback=True)
    assert policy.organization == "default" and "Docker Hub only" in where


def test_config_rules_for_signatures_and_sources(keys, tmp_path):
    good = f'[policy]\nsignatures = "require"\ntrusted_keys = ["{keys[0].line}", "{keys[1].pub}"]\n'
    assert config_mod.from_text(good).policy.signatures == "require"
    for text, message in [
        ('[policy]\nsignatures = "always"\n', "policy.signatures is 'always'"),
        ('[policy]\nsignatures = "require"\n', "needs at least one minisign public key"),
        ('[policy]\nsignatures = "warn"\ntrusted_keys = ["RWQnotakey"]\n', r"policy.trusted_keys\[0\]"),
        (f'[policy]\nsignatures = "warn"\ntrusted_keys = ["{tmp_path}/missing.pub"]\n', "cannot read"),
        ('[policy]\nrefresh_jitter = 0.9\n', "policy.refresh_jitter"),
        ('[policy]\nsource = "ftp://example.test/p.json"\n', "a URL source is https://"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_mod.from_text(text)
    assert config_mod.from_text("[policy]\nrefresh_jitter = 0\n").policy.refresh_jitter == 0.0


def test_a_plain_http_source_needs_required_signatures(keys):
    """Issue #12: http:// was accepted (and its redirects followed): anyone on the path could
    serve any policy."""
    with pytest.raises(ConfigError, match="plain HTTP"):
        config_mod.from_text('[policy]\nsource = "http://192.0.2.1/policy.json"\n')
    with pytest.raises(ConfigError, match="plain HTTP"):
        config_mod.from_text(f'[policy]\nsource = "http://192.0.2.1/policy.json"\nsignatures = "warn"\n'
                             f'trusted_keys = ["{keys[0].line}"]\n')
    config_mod.from_text(f'[policy]\nsource = "http://192.0.2.1/policy.json"\nsignatures = "require"\n'
                         f'trusted_keys = ["{keys[0].line}"]\n')


def test_doctor_says_how_the_policy_is_trusted(keys, tmp_path):
    off = source.describe(config_mod.PolicySettings(source="https://policy.example.test/p.json"))
    assert "polled every 300 s +/- 10%" in off[0] and "signatures: off" in off[1]
    on = source.describe(settings(keys=[keys[0].line], cache=str(tmp_path / "c.json")))
    assert f"require, trusted keys {keys[0].key_id}" in on[1] and "highest accepted: none yet" in on[1]


def test_status_fields_for_a_file_source_turn_red_when_the_policy_expires():
    from types import SimpleNamespace

    from ramfw import policy
    from ramfw.daemon import poller

    expiring = policy.from_text(policy_text(version=4, expires="2027-01-01T00:00:00Z"))
    daemon = SimpleNamespace(policy=expiring, policy_loaded=1798761000.0)
    fresh = poller.status_fields(daemon, 1798761000.0 + 60)
    assert fresh == {"fetched_at": 1798761000.0, "age": 60, "next_poll": None, "stale": ""}
    assert "expired at 2027-01-01T00:00:00Z" in poller.status_fields(daemon, 1798761600.0)["stale"]
    assert poller.describe(expiring) == "acme, version 4, unsigned"
