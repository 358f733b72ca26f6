"""ramfw check's pure core: references, challenges, platforms, logins, verdicts, exit codes."""

import base64
import json

import pytest

from ramfw import policy as policy_mod
from ramfw.check import credentials, probe, verdict
from ramfw.check.reference import Reference, parse
from ramfw.errors import InvalidReference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, expected", [
    ("alpine", ("docker.io", "registry-1.docker.io", 443, "library/alpine", "latest", "")),
    ("alpine:3.19", ("docker.io", "registry-1.docker.io", 443, "library/alpine", "3.19", "")),
    ("user/repo", ("docker.io", "registry-1.docker.io", 443, "user/repo", "latest", "")),
    ("docker.io/alpine", ("docker.io", "registry-1.docker.io", 443, "library/alpine", "latest", "")),
    ("index.docker.io/library/alpine", ("docker.io", "registry-1.docker.io", 443, "library/alpine", "latest", "")),
    ("ghcr.io/org/tool:v1", ("ghcr.io", "ghcr.io", 443, "org/tool", "v1", "")),
    ("localhost/app", ("localhost", "localhost", 443, "app", "latest", "")),
    ("localhost:5000/a/b", ("localhost:5000", "localhost", 5000, "a/b", "latest", "")),
    (f"reg.example:5000/a/b:t@{DIGEST}", ("reg.example:5000", "reg.example", 5000, "a/b", "t", DIGEST)),
    (f"alpine@{DIGEST}", ("docker.io", "registry-1.docker.io", 443, "library/alpine", "", DIGEST)),
    ("[2001:db8::1]:5000/x", ("[2001:db8::1]:5000", "2001:db8::1", 5000, "x", "latest", "")),
    ("203.0.113.20/test/image:1", ("203.0.113.20", "203.0.113.20", 443, "test/image", "1", "")),
    ("Registry.Example/repo", ("Registry.Example", "registry.example", 443, "repo", "latest", "")),
    ("a/b__c/d-e.f:tag", ("docker.io", "registry-1.docker.io", 443, "a/b__c/d-e.f", "tag", "")),
])
def test_references_are_normalised_as_the_engine_does(text, expected):
    found = parse(text)
    assert (found.domain, found.host, found.port, found.repository, found.tag, found.digest) == expected


def test_the_digest_is_what_a_pull_fetches_and_the_text_form_is_complete():
    found = parse(f"reg.example/a:t@{DIGEST}")
    assert found.manifest == DIGEST and found.to_text() == f"reg.example/a:t@{DIGEST}"
    assert parse("alpine").to_text() == "docker.io/library/alpine:latest"
    assert parse("203.0.113.20/x").is_address and not parse("reg.example/x").is_address


@pytest.mark.parametrize("text, rule", [
    ("", "empty"), (" alpine", "white space"), ("https://ghcr.io/x", "no scheme"),
    ("Alpine", "lower-case"), ("ghcr.io/Org/x", "lower-case"), ("alpine:-bad", "tag"),
    ("a" * 64, "image ID"), ("alpine@sha256:xyz", "not a digest"), ("ghcr.io/", "no repository"),
    ("reg_x.example/a", "not a registry host"), ("reg.example:99999/a", "out of range"), ("a//b", "lower-case"),
    ("[fe80::zz]/a", "not a registry"),
])
def test_bad_references_are_refused_with_the_rule(text, rule):
    with pytest.raises(InvalidReference, match=rule) as caught:
        parse(text)
    assert caught.value.exit_code == 2


def test_challenges_are_read_with_their_quoted_parameters():
    scheme, params = probe.challenge('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                                     'scope="repository:library/alpine:pull,push"')
    assert scheme == "bearer" and params == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                                             "scope": "repository:library/alpine:pull,push"}
    assert probe.challenge('Basic realm="Registry \\"x\\""') == ("basic", {"realm": 'Registry "x"'})
    assert probe.challenge("Bearer realm=https://a/token , service=x") == (
        "bearer", {"realm": "https://a/token", "service": "x"})
    assert probe.challenge("") == ("", {})


INDEX = {"manifests": [
    {"digest": "sha256:arm7", "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
    {"digest": "sha256:att", "platform": {"os": "unknown", "architecture": "unknown"}},
    {"digest": "sha256:arm64", "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
    {"digest": "sha256:amd64", "platform": {"os": "linux", "architecture": "amd64"}},
    {"digest": "sha256:win", "platform": {"os": "windows", "architecture": "amd64"}},
]}


def test_the_vms_platform_is_picked_from_an_index_never_an_attestation():
    assert probe.vm_platform("x86_64") == ("linux", "amd64", "")
    assert probe.pick_platform(INDEX, probe.vm_platform("x86_64"))["digest"] == "sha256:amd64"
    assert probe.pick_platform(INDEX, ("linux", "arm64", ""))["digest"] == "sha256:arm64"
    assert probe.pick_platform(INDEX, ("linux", "arm", "v7"))["digest"] == "sha256:arm7"
    assert probe.pick_platform(INDEX, ("linux", "s390x", "")) is None
    assert probe.pick_platform({"manifests": "junk"}, ("linux", "amd64", "")) is None


def basic(user="u", password="p"):
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_logins_are_found_by_registry_name_and_never_shown():
    text = json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": basic("hub")},
                                 "https://reg.example:5000/v2/": {"auth": basic()},
                                 "tok.example": {"identitytoken": "secret"}}})
    hub = credentials.login_for(parse("alpine"), text, "/root/.docker/config.json")
    assert hub.basic == basic("hub") and "secret" not in hub.how and "index.docker.io" in hub.how
    assert credentials.login_for(parse("reg.example:5000/a"), text, "c").basic == basic()
    assert credentials.login_for(parse("reg.example/a"), text, "c").basic == ""
    assert "identity token" in credentials.login_for(parse("tok.example/a"), text, "c").how
    helper = credentials.login_for(parse("ghcr.io/a"), json.dumps({"credsStore": "desktop"}), "c")
    assert helper.basic == "" and "docker-credential-desktop" in helper.how
    assert "not readable" in credentials.login_for(parse("ghcr.io/a"), None, "c").how
    assert credentials.login_for(parse("ghcr.io/a"), "[1]", "c").how.startswith("anonymous")
    assert credentials.login_for(parse("reg.example/a"), json.dumps(
        {"auths": {"reg.example": {"auth": "not base64!"}}}), "c").basic == ""


def test_the_config_file_is_where_the_docker_cli_looks(tmp_path):
    assert credentials.config_path({"DOCKER_CONFIG": "/x"}) == credentials.Path("/x/config.json")
    assert credentials.config_path({}, home="/root") == credentials.Path("/root/.docker/config.json")
    assert credentials.read(parse("alpine"), tmp_path / "missing.json").how == "anonymous"


def step(role, host, status=200, location="", error="", addresses=("203.0.113.10",)):
    return {"role": role, "host": host, "port": 443, "path": "/", "status": status, "error": error,
            "address": addresses[0] if addresses and not error else "", "addresses": list(addresses),
            "location": location}


def probed(registry, steps, complete=True, error=""):
    return {"reference": f"{registry}/test/image:1", "registry": registry, "port": 443, "domain": registry,
            "login": "anonymous", "by": "ramfw check", "complete": complete, "error": error, "steps": steps}


def policy(*registries, hub=True, enabled=True):
    return policy_mod.from_data({"organizations": [{"name": "acme", "registryAccess": {
        "enabled": enabled, "allowDockerHub": hub, "registries": [{"address": r} for r in registries]}}]})


REDIRECT = probed("redirect-registry.test", [
    step("registry", "redirect-registry.test", 401, addresses=("203.0.113.40",)),
    step("registry", "redirect-registry.test", addresses=("203.0.113.40",)),
    step("blob", "redirect-registry.test", 307, "https://blobs.redirect-cdn.test/v2/x", addresses=("203.0.113.40",)),
    step("redirect", "blobs.redirect-cdn.test", addresses=("203.0.113.30",)),
])
LEARNED = verdict.Kernel(True, "enforce", {"203.0.113.40": "redirect-registry.test",
                                           "203.0.113.30": "blobs.redirect-cdn.test"})


def test_a_redirect_to_a_cdn_the_policy_lacks_is_named_with_the_entry_to_add():
    report = verdict.judge(REDIRECT, policy("redirect-registry.test"), verdict.Kernel(True, "enforce", {
        "203.0.113.40": "redirect-registry.test"}))
    rows = {row["host"]: row for row in report["hosts"]}
    assert rows["redirect-registry.test"]["roles"] == ["registry", "blobs"]
    assert rows["redirect-registry.test"]["answer"] == "HTTP 307 to blobs.redirect-cdn.test"
    assert (rows["redirect-registry.test"]["policy"], rows["redirect-registry.test"]["kernel"]) == ("allowed", "learned")
    cdn = rows["blobs.redirect-cdn.test"]
    assert cdn["roles"] == ["blobs redirect"] and cdn["policy"] == "blocked" and cdn["kernel"] == "not learned"
    assert report["add"] == ["blobs.redirect-cdn.test"] and report["verdict"] == "blocked"
    assert verdict.exit_code([report]) == verdict.EXIT_BLOCKED
    lines = verdict.to_lines(report)
    assert lines[0].endswith("the policy blocks blobs.redirect-cdn.test") and "  add: blobs.redirect-cdn.test" in lines
    add, todo = verdict.summary([report, report])
    assert add == ["blobs.redirect-cdn.test"] and '{"address": "blobs.redirect-cdn.test"}' in todo


def test_once_the_entry_is_added_and_learned_the_pull_is_allowed():
    report = verdict.judge(REDIRECT, policy("redirect-registry.test", "blobs.redirect-cdn.test"), LEARNED)
    assert report["verdict"] == "allowed" and report["add"] == [] and verdict.exit_code([report]) == 0
    assert {row["learned_as"][0] for row in report["hosts"]} == {"redirect-registry.test", "blobs.redirect-cdn.test"}


def test_allowed_but_not_learned_is_the_kernels_refusal():
    partly = verdict.Kernel(True, "enforce", {"203.0.113.40": "redirect-registry.test"})
    two = probed("redirect-registry.test", REDIRECT["steps"][:2] + [
        step("blob", "redirect-registry.test", addresses=("203.0.113.40", "2001:db8::40"))])
    report = verdict.judge(two, policy("redirect-registry.test"), partly)
    assert report["hosts"][0]["kernel"] == "partly learned" and report["verdict"] == "not allowed by the kernel now"
    assert verdict.exit_code([report]) == verdict.EXIT_KERNEL
    assert verdict.to_lines(report)[0].endswith("the kernel would refuse redirect-registry.test")
    for kernel, word in ((verdict.Kernel(False), "not enforcing"), (verdict.Kernel(True, "audit"), "audit mode")):
        assert verdict.judge(two, policy("redirect-registry.test"), kernel)["verdict"] == "allowed", word


def test_blocked_comes_before_an_unfinished_probe_which_comes_before_the_kernel():
    stopped = probed("blocked-registry.test", [step("registry", "blocked-registry.test", error="connection refused",
                                                    addresses=("203.0.113.20",))], complete=False,
                     error="blocked-registry.test: connection refused")
    blocked = verdict.judge(stopped, policy("allowed-registry.test"), verdict.Kernel(True))
    assert blocked["verdict"] == "blocked" and blocked["add"] == ["blocked-registry.test"]
    assert "  (the probe stopped: blocked-registry.test: connection refused)" in verdict.to_lines(blocked)
    unfinished = verdict.judge(stopped, policy("blocked-registry.test"), verdict.Kernel(True))
    assert unfinished["verdict"] == "incomplete" and verdict.exit_code([unfinished]) == verdict.EXIT_INCOMPLETE
    kernel = verdict.judge(REDIRECT, policy("redirect-registry.test", "blobs.redirect-cdn.test"), verdict.Kernel(True))
    assert verdict.exit_code([kernel, unfinished]) == verdict.EXIT_INCOMPLETE
    assert verdict.exit_code([kernel, unfinished, blocked]) == verdict.EXIT_BLOCKED


def test_docker_hub_hosts_ask_for_allow_docker_hub_and_its_profile_fills_what_was_not_seen():
    hub = probed("registry-1.docker.io", [step("registry", "registry-1.docker.io", 401)], complete=False,
                 error="registry-1.docker.io: connection refused")
    report = verdict.judge(hub, policy(hub=False), verdict.Kernel(True))
    assert report["add"] == [verdict.ALLOW_DOCKER_HUB] and report["verdict"] == "blocked"
    profiled = [row for row in report["hosts"] if row["source"] == "profile"]
    assert {row["host"] for row in profiled} >= {"auth.docker.io", "production.cloudflare.docker.com"}
    assert all(row["counts"] and row["kernel"] == "not probed" for row in profiled)
    assert "allowDockerHub" in verdict.summary([report])[1]
    assert verdict.judge(hub, policy(), verdict.Kernel(True))["verdict"] == "incomplete"


def test_profile_hosts_the_probe_did_not_need_do_not_count_but_are_named():
    ghcr = probed("ghcr.io", [step("registry", "ghcr.io"), step("blob", "ghcr.io")])
    report = verdict.judge(ghcr, policy("ghcr.io"), verdict.Kernel(False))
    extra = [row for row in report["hosts"] if row["source"] == "profile"]
    assert [row["host"] for row in extra] == ["pkg-containers.githubusercontent.com"] and not extra[0]["counts"]
    assert report["verdict"] == "allowed" and report["add"] == []
    assert any("pkg-containers.githubusercontent.com" in w for w in report["warnings"])
    assert "(may also use)" in verdict.to_lines(report)[-2]


def test_a_shared_hosting_wildcard_is_never_suggested_the_exact_host_is():
    ecr = probed("public.ecr.aws", [step("registry", "public.ecr.aws")], complete=False, error="timed out")
    report = verdict.judge(ecr, policy("public.ecr.aws"), verdict.Kernel(True))
    assert report["add"] == [] and any("*.cloudfront.net" in w and "could not see" in w for w in report["warnings"])
    seen = probed("public.ecr.aws", [step("registry", "public.ecr.aws"),
                                     step("blob", "public.ecr.aws", 307, "https://d1.cloudfront.net/x"),
                                     step("redirect", "d1.cloudfront.net")])
    exact = verdict.judge(seen, policy("public.ecr.aws"), verdict.Kernel(True))
    assert exact["add"] == ["d1.cloudfront.net"] and all(row["source"] == "probe" for row in exact["hosts"])


def test_addresses_and_loopback():
    literal = probed("203.0.113.20", [step("registry", "203.0.113.20", addresses=("203.0.113.20",))])
    report = verdict.judge(literal, policy("allowed-registry.test"), verdict.Kernel(True))
    assert report["verdict"] == "blocked" and report["add"] == [] and "IP address" in report["warnings"][0]
    local = probed("localhost", [step("registry", "localhost", addresses=("127.0.0.1",)),
                                 step("blob", "localhost", addresses=("127.0.0.1",))])
    report = verdict.judge(local, policy("allowed-registry.test"), verdict.Kernel(True))
    assert report["hosts"][0]["policy"] == report["hosts"][0]["kernel"] == "not egress"
    assert report["verdict"] == "allowed"
    disabled = verdict.judge(REDIRECT, policy(enabled=False), verdict.Kernel(False))
    assert disabled["verdict"] == "allowed" and {r["policy"] for r in disabled["hosts"]} == {"not restricted"}


def test_the_policy_in_force_is_rebuilt_from_its_summary():
    original = policy("ghcr.io", "*.example.com", hub=False)
    again = policy_mod.from_summary(original.summary())
    for name in ("ghcr.io", "x.example.com", "example.com", "registry-1.docker.io", "pkg.ghcr.io"):
        assert bool(again.allows(name)) == bool(original.allows(name)), name
    assert again.organization == "acme" and not again.allow_docker_hub


def test_a_reference_is_a_value():
    assert parse("alpine") == Reference("docker.io", "registry-1.docker.io", 443, "library/alpine", "latest")
