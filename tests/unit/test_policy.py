import json

import pytest

from ramfw import policy
from ramfw.errors import PolicyError
from ramfw.policy.names import Pattern
from ramfw.policy.profiles import DOCKER_HUB_HOSTS


def doc(registries=None, enabled=True, hub=True, extra_orgs=(), **access):
    access = {"enabled": enabled, "allowDockerHub": hub,
              "registries": registries if registries is not None else [], **access}
    orgs = [{"name": "acme", "registryAccess": access}] + list(extra_orgs)
    return {"organizations": orgs}


def load(data, **kw):
    return policy.from_data(data, **kw)


def test_the_example_policy():
    p = load(doc([{"address": "ghcr.io", "nickname": "GitHub"},
                  {"address": "123456789012.dkr.ecr.us-west-2.amazonaws.com", "nickname": "ECR"}]))
    assert p.organization == "acme" and p.enabled and p.allow_docker_hub
    assert p.allows("ghcr.io") and p.allows("123456789012.dkr.ecr.us-west-2.amazonaws.com")
    assert p.allows("quay.io") is None


def test_docker_hub_expands_to_its_real_hosts():
    p = load(doc([]))
    for host in DOCKER_HUB_HOSTS:
        assert p.allows(host), host
    assert p.allows("docker.io") is None
    assert load(doc([], hub=False)).allows("registry-1.docker.io") is None


def test_allow_docker_hub_defaults_to_true():
    p = load({"organizations": [{"name": "x", "registryAccess": {"registries": []}}]})
    assert p.allow_docker_hub and p.enabled


def test_only_the_first_organization_is_enforced_others_named():
    other = {"name": "globex", "registryAccess": {"registries": [{"address": "quay.io"}]}}
    p = load(doc([{"address": "ghcr.io"}], extra_orgs=[other]))
    assert p.organization == "acme" and p.allows("quay.io") is None
    assert any("globex" in note and "acme" in note for note in p.notes)


def test_disabled_policy_is_reported():
    p = load(doc([], enabled=False))
    assert not p.enabled
    assert any("not enabled" in w for w in policy.lint(p))


def test_port_is_ignored_with_a_note():
    p = load(doc([{"address": "registry.example.com:5000"}]))
    assert p.allows("registry.example.com")
    assert any("port 5000 ignored" in note for note in p.notes)


@pytest.mark.parametrize("data, where, rule", [
    ([], "policy", "must be an object"),
    ({"organisations": []}, "policy", "unknown field 'organisations'"),
    ({}, "policy", "needs an \"organizations\""),
    ({"organizations": {}}, "organizations", "must be a list"),
    ({"organizations": []}, "organizations", "empty"),
    ({"organizations": ["acme"]}, "organizations[0]", "must be an object"),
    ({"organizations": [{"name": "a"}]}, "organizations[0]", "registryAccess"),
    ({"organizations": [{"name": 3, "registryAccess": {}}]}, "organizations[0].name", "must be a string"),
    (doc([], enabled="yes"), "registryAccess.enabled", "true or false"),
    (doc([], hub=1), "registryAccess.allowDockerHub", "true or false"),
    (doc({"address": "ghcr.io"}), "registryAccess.registries", "must be a list"),
    (doc(["ghcr.io"]), "registries[0]", "must be an object"),
    (doc([{"nickname": "x"}]), "registries[0]", "needs an \"address\""),
    (doc([{"address": "ghcr.io", "nick": "x"}]), "registries[0]", "unknown field 'nick'"),
    (doc([{"address": "ghcr.io", "nickname": 5}]), "registries[0].nickname", "must be a string"),
    (doc([{"address": "ghcr.io"}, {"address": "10.1.2.3"}]), "registries[1] '10.1.2.3'", "not IP addresses"),
    (doc([{"address": "https://ghcr.io"}]), "registries[0] 'https://ghcr.io'", "not URLs"),
    (doc([{"address": "ghcr.io/x"}]), "registries[0]", "drop the path"),
    (doc([{"address": "ghcr.io "}]), "registries[0] 'ghcr.io '", "must not have leading or trailing white space"),
    (doc([{"address": "a..b"}]), "registries[0]", "empty label"),
    (doc([{"address": "x" * 64 + ".io"}]), "registries[0]", "longer than 63"),
    (doc([{"address": "bad_name.io"}]), "registries[0]", "invalid characters"),
    (doc([{"address": 7}]), "registries[0]", "strings"),
    (doc([{"address": "ghcr.io"}, {"address": "GHCR.io."}]), "registries[1] 'GHCR.io.'", "duplicate of registries[0]"),
    (doc([], surprise=True), "registryAccess", "unknown field 'surprise'"),
])
def test_every_rejection_names_the_entry_and_the_rule(data, where, rule):
    with pytest.raises(PolicyError) as err:
        load(data)
    assert where in str(err.value) and rule in str(err.value), str(err.value)


def test_a_broken_later_organization_rejects_the_whole_file():
    bad = {"name": "globex", "registryAccess": {"registries": [{"address": "10.0.0.1"}]}}
    with pytest.raises(PolicyError, match=r"organizations\[1\]"):
        load(doc([{"address": "ghcr.io"}], extra_orgs=[bad]))


def test_cap_is_100_by_default_and_configurable():
    entries = [{"address": f"r{i}.example.com"} for i in range(101)]
    with pytest.raises(PolicyError, match="101 registries, more than the cap of 100"):
        load(doc(entries))
    assert len(load(doc(entries), max_registries=101).registries) == 101


def test_ten_thousand_entries_load_and_match():
    entries = [{"address": f"registry{i}.example.com"} for i in range(10_000)]
    p = load(doc(entries), max_registries=10_000)
    assert len(p.matcher) == 10_000 + len(DOCKER_HUB_HOSTS)
    assert p.allows("blob.registry9999.example.com") == Pattern("registry9999.example.com")
    assert p.allows("registry10000.example.com") is None
    assert policy.lint(p) == []


def test_from_text_and_from_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc([{"address": "ghcr.io"}])))
    assert policy.from_file(path).allows("ghcr.io")
    path.write_text("{ not json")
    with pytest.raises(PolicyError, match="not valid JSON"):
        policy.from_file(path)
    with pytest.raises(PolicyError, match="cannot read"):
        policy.from_file(tmp_path / "missing.json")


def test_lint_names_missing_redirect_domains():
    p = load(doc([{"address": "ghcr.io"}, {"address": "123456789012.dkr.ecr.us-west-2.amazonaws.com"},
                  {"address": "myreg.azurecr.io"}, {"address": "quay.io"}, {"address": "cdn.quay.io"}]))
    warnings = policy.lint(p)
    assert "pulls from ghcr.io will fail: also allow pkg-containers.githubusercontent.com" in warnings
    assert ("pulls from 123456789012.dkr.ecr.us-west-2.amazonaws.com will fail: also allow "
            "prod-us-west-2-starport-layer-bucket.s3.us-west-2.amazonaws.com") in warnings
    assert any(w.startswith("pulls from myreg.azurecr.io will fail: also allow *.blob.core.windows.net")
               for w in warnings)
    # quay.io allows its own cdn*.quay.io subdomains; only the S3 bucket is missing.
    assert "pulls from quay.io will fail: also allow quayio-production-s3.s3.amazonaws.com" in warnings
    assert "cdn.quay.io is already allowed by quay.io" in warnings


def test_lint_is_quiet_when_redirects_are_allowed_by_exact_hosts():
    p = load(doc([{"address": "ghcr.io"}, {"address": "pkg-containers.githubusercontent.com"},
                  {"address": "quay.io"}, {"address": "quayio-production-s3.s3.amazonaws.com"}]))
    assert policy.lint(p) == []


def test_lint_reports_redundant_entries():
    p = load(doc([{"address": "example.com"}, {"address": "registry.example.com"}]))
    assert "registry.example.com is already allowed by example.com" in policy.lint(p)


def test_docker_io_entry_without_hub_needs_the_cdn():
    p = load(doc([{"address": "registry-1.docker.io"}], hub=False))
    assert any(w.startswith("pulls from registry-1.docker.io will fail") and
               "production.cloudflare.docker.com" in w for w in policy.lint(p))


def test_lint_warns_about_entries_that_let_anyones_registry_in():
    """Issue #8, 10: lint advice (*.cloudfront.net, *.blob.core.windows.net, *.pkg.dev) and the
    seed's `amazonaws.com` allow whatever anyone hosts there."""
    from ramfw.policy import hosting

    if not hosting.available():
        pytest.skip("Debian's publicsuffix and python3-publicsuffix2 are not installed (scripts/setup)")
    entries = ["amazonaws.com", "*.cloudfront.net", "blob.core.windows.net", "*.pkg.dev", "storage.googleapis.com",
               "ghcr.io", "d1.cloudfront.net", "myregistry.blob.core.windows.net", "quayio-production-s3.s3.amazonaws.com"]
    allowed = policy.from_data({"organizations": [{"name": "acme", "registryAccess": {
        "registries": [{"address": e} for e in entries]}}]})
    warned = {w.split(" ", 1)[0] for w in policy.lint(allowed) if "anyone can host" in w}
    assert warned == {"amazonaws.com", "*.cloudfront.net", "blob.core.windows.net", "*.pkg.dev",
                      "storage.googleapis.com"}
    gap = policy.lint(policy.from_data({"organizations": [{"name": "acme", "registryAccess": {
        "registries": [{"address": "public.ecr.aws"}]}}]}))
    assert any("*.cloudfront.net" in w and "shared hosting" in w for w in gap)
