"""Polling a policy URL politely (issue #12), against a real HTTPS origin on loopback (TLS from a
throw-away CA) with real minisign signatures: https only, no redirect to another scheme,
conditional GETs, the same bytes again change nothing, Retry-After and backoff, signatures
fetched beside the policy. No root needed: nothing leaves 127.0.0.1."""

import shutil
import time
from pathlib import Path

import pytest

from ramfw import config as config_mod
from ramfw.policy import source
from tests.lab.origin import Origin
from tests.support.signing import Signer, policy_text

pytestmark = pytest.mark.skipif(shutil.which("minisign") is None or shutil.which("openssl") is None,
                                reason="minisign and openssl are needed (scripts/setup)")


@pytest.fixture
def origin(tmp_path):
    server = Origin(tmp_path)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def plain(tmp_path):
    (tmp_path / "plain").mkdir()
    server = Origin(tmp_path / "plain", tls=False)
    try:
        yield server
    finally:
        server.close()


def settings(origin, tmp_path, **more):
    return config_mod.PolicySettings(source=f"{origin.base}/policy.json", cache=str(tmp_path / "cache/policy.json"),
                                     ca_file=str(origin.ca or ""), **more)


def test_a_redirect_from_https_to_http_is_refused(origin, plain, tmp_path):
    """Issue #12: urllib followed any redirect, so an https source could hand over to plain
    HTTP, where anyone on the path serves the policy."""
    plain.put("/policy.json", policy_text(("ghcr.io", "evil.test")))
    origin.answer["/policy.json"] = (302, {"Location": f"{plain.base}/policy.json"})
    with pytest.raises(OSError, match="redirect"):
        source.fetch(f"{origin.base}/policy.json", ca_file=str(origin.ca))
    assert not plain.requests, "the plain HTTP origin was never asked"


def test_a_redirect_within_https_is_followed(origin):
    origin.put("/v2/policy.json", policy_text())
    origin.answer["/policy.json"] = (301, {"Location": "/v2/policy.json"})
    assert source.fetch(f"{origin.base}/policy.json", ca_file=str(origin.ca)).body == policy_text().encode()


def test_plain_http_is_refused_unless_signatures_are_required(plain):
    plain.put("/policy.json", policy_text())
    with pytest.raises(OSError, match="https://"):
        source.fetch(f"{plain.base}/policy.json")
    assert source.fetch(f"{plain.base}/policy.json", allow_http=True).changed


def test_an_origin_without_validators_serving_the_same_bytes_changes_nothing(origin, tmp_path):
    """Issue #12 (the tight loop): against an origin without ETag every 200 was a new policy,
    and a reload."""
    origin.etag = origin.last_modified = False
    origin.put("/policy.json", policy_text())
    polls = source.UrlSource(settings(origin, tmp_path))
    assert polls.refresh() is True
    assert [polls.refresh() for _ in range(3)] == [False, False, False]
    assert polls.outcome == "unchanged (the same content)" and not polls.last_error
    origin.put("/policy.json", policy_text(("ghcr.io", "quay.io")))
    assert polls.refresh() is True


def test_conditional_gets_send_the_validators_the_origin_gave(origin, tmp_path):
    origin.put("/policy.json", policy_text())
    polls = source.UrlSource(settings(origin, tmp_path))
    assert polls.refresh() is True
    assert polls.refresh() is False and polls.outcome.startswith("unchanged (304")
    headers = origin.requests[-1][3]
    assert headers.get("If-None-Match", "").startswith('"') and "GMT" in headers.get("If-Modified-Since", "")
    origin.etag = False  # Last-Modified alone is enough for a 304
    assert polls.refresh() is False and polls.outcome.startswith("unchanged")


def test_signed_policies_are_fetched_with_their_signature_and_checked(origin, tmp_path):
    old, new = Signer(tmp_path, "old"), Signer(tmp_path, "new")
    s = settings(origin, tmp_path, signatures="require", trusted_keys=(old.line, new.line))
    body, sig = old.signed(tmp_path, policy_text(version=1))
    origin.put("/policy.json", body)
    origin.put("/policy.json.minisig", sig)
    polls = source.UrlSource(s)
    assert polls.refresh() and polls.accepted.signer == old.key_id
    # rotated: version 2 by the new key
    body, sig = new.signed(tmp_path, policy_text(("ghcr.io", "quay.io"), version=2))
    origin.put("/policy.json", body)
    origin.put("/policy.json.minisig", sig)
    assert polls.refresh() and polls.accepted.signer == new.key_id and polls.accepted.version == 2
    cached = (tmp_path / "cache/policy.json").read_bytes()
    # refused, each: the cache keeps version 2
    body1, sig1 = old.signed(tmp_path, policy_text(version=1), "replay.json")
    for served, signature, why in [(body1, sig1, "older than version 2"),
                                   (body.replace(b"quay.io", b"evil.test"), sig, "does not verify"),
                                   (policy_text(version=3).encode(), None, "no signature")]:
        origin.put("/policy.json", served)
        if signature is None:
            del origin.files["/policy.json.minisig"]
        else:
            origin.put("/policy.json.minisig", signature)
        assert polls.refresh() is False
        assert why in polls.last_error and "refused" in polls.outcome
        assert (tmp_path / "cache/policy.json").read_bytes() == cached
    policy, _ = source.load(config_mod.Config(policy=s))
    assert (policy.version, policy.signer) == (2, new.key_id)


def test_errors_back_off_and_retry_after_is_honoured(origin, tmp_path):
    from ramfw.daemon.poller import Poller

    origin.put("/policy.json", policy_text())
    s = settings(origin, tmp_path, refresh_interval=60, refresh_jitter=0.0, max_backoff=600)
    poller = Poller(source.UrlSource(s), lambda: None, lambda error: None, rand=lambda: 0.5)
    assert poller.poll() and poller.delay() == 60
    origin.answer["/policy.json"] = (503, {})
    delays = []
    for _ in range(5):
        poller.poll()
        delays.append(poller.delay())
    assert delays == [60, 120, 240, 480, 600] and poller.failures == 5
    origin.answer["/policy.json"] = (429, {"Retry-After": "500"})
    poller.poll()
    assert poller.delay() == 600  # the backoff (600) was already longer than asked
    poller.failures = 0
    poller.poll()
    assert poller.failures == 1 and poller.delay() == 500
    del origin.answer["/policy.json"]
    assert poller.poll() is False and poller.failures == 0 and poller.delay() == 60


def test_a_poller_reports_an_error_once_not_every_poll(origin, tmp_path):
    from ramfw.daemon.poller import Poller

    said = []
    origin.answer["/policy.json"] = (503, {})
    poller = Poller(source.UrlSource(settings(origin, tmp_path)), lambda: None, said.append)
    for _ in range(4):
        poller.poll()
    assert len(said) == 1 and "HTTP 503" in said[0]


def test_the_cache_is_not_used_for_another_urls_validators(origin, tmp_path):
    origin.put("/policy.json", policy_text())
    polls = source.UrlSource(settings(origin, tmp_path))
    assert polls.refresh()
    meta = source.meta(Path(tmp_path / "cache/policy.json"), f"{origin.base}/other.json")
    assert meta == {}


def test_a_plain_http_source_with_required_signatures_trusts_the_signature_only(plain, tmp_path):
    key = Signer(tmp_path, "key")
    body, sig = key.signed(tmp_path, policy_text(version=1))
    plain.put("/policy.json", body)
    plain.put("/policy.json.minisig", sig)
    s = settings(plain, tmp_path, signatures="require", trusted_keys=(key.line,))
    polls = source.UrlSource(s)
    assert polls.refresh() and polls.accepted.signer == key.key_id
    plain.put("/policy.json", policy_text(("ghcr.io", "evil.test"), version=2))  # what a man in the middle serves
    assert polls.refresh() is False and "does not verify" in polls.last_error
    unsigned = source.UrlSource(settings(plain, tmp_path / "other"))  # the same source, signatures off
    assert unsigned.refresh() is False and "a policy source is https://" in unsigned.last_error


def test_a_restart_within_an_interval_of_the_last_answer_does_not_fetch(origin, tmp_path):
    origin.put("/policy.json", policy_text())
    s = settings(origin, tmp_path, refresh_interval=300)
    first = source.UrlSource(s)
    assert first.due(1_000.0) and first.refresh(now=1_000.0)
    again = source.UrlSource(s)  # a restarted daemon reads when the origin last answered
    assert not again.due(1_000.0 + 299) and again.due(1_000.0 + 300)
    (tmp_path / "cache/policy.json").unlink()
    assert again.due(1_000.0 + 1)  # nothing cached: fetch


def test_a_cached_policy_no_longer_trusted_is_fetched_again_whole(origin, tmp_path):
    """A key rolled without a new version: the origin's policy is re-signed by the new key,
    the old key leaves the configuration. The cached copy no longer verifies; a 304 (or the
    same bytes) must not leave the VM on the default: the poll asks without validators."""
    old, new = Signer(tmp_path, "old"), Signer(tmp_path, "new")
    body, sig = old.signed(tmp_path, policy_text(version=4))
    origin.put("/policy.json", body)
    origin.put("/policy.json.minisig", sig)
    first = source.UrlSource(settings(origin, tmp_path, signatures="require", trusted_keys=(old.line,)))
    assert first.refresh()
    origin.put("/policy.json.minisig", new.sign(tmp_path / "policy.json").read_bytes())  # the same bytes, re-signed
    rolled = settings(origin, tmp_path, signatures="require", trusted_keys=(new.line,))
    policy, where = source.load(config_mod.Config(policy=rolled))
    assert policy.organization == "default"  # the cached copy is refused: Docker Hub only, for now
    again = source.UrlSource(rolled)
    assert again.due(time.time())  # not "fresh": what is cached is not acceptable
    assert again.refresh() and again.accepted.signer == new.key_id
    assert "If-None-Match" not in origin.requests[-2][3]  # the policy was asked for whole
    assert source.load(config_mod.Config(policy=rolled))[0].signer == new.key_id
    assert again.refresh() is False and again.outcome.startswith("unchanged (304")
