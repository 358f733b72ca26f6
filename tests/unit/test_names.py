import pytest

from ramfw.policy.names import InvalidName, Matcher, Pattern, canonical, parse_entry


def entry(text):
    return parse_entry(text).pattern


@pytest.mark.parametrize("text, domain, wildcard", [
    ("ghcr.io", "ghcr.io", False),
    ("GHCR.IO.", "ghcr.io", False),
    ("*.example.com", "example.com", True),
    ("bücher.example", "xn--bcher-kva.example", False),
    ("*.Bücher.Example.", "xn--bcher-kva.example", True),
    ("xn--bcher-kva.example", "xn--bcher-kva.example", False),
    ("a" * 63 + ".com", "a" * 63 + ".com", False),
])
def test_entries_are_normalised(text, domain, wildcard):
    assert entry(text) == Pattern(domain, wildcard)


def test_host_port_keeps_the_host_and_reports_the_port():
    parsed = parse_entry("registry.example.com:5000")
    assert parsed.pattern == Pattern("registry.example.com")
    assert parsed.port == 5000


@pytest.mark.parametrize("text, rule", [
    ("10.0.0.1", "not IP addresses"),
    ("10.0.0.1:5000", "not IP addresses"),
    ("2001:db8::1", "not IP addresses"),
    ("[2001:db8::1]:443", "not IP addresses"),
    ("1.2.3", "numeric"),
    ("https://ghcr.io", "not URLs"),
    ("ghcr.io/owner/image", "drop the path"),
    ("", "must not be empty"),
    ("   ", "must not be empty"),
    ("ghcr.io ", "must not have leading or trailing white space"),
    ("  registry.example.com", "must not have leading or trailing white space"),
    ("ghcr.io\n", "must not have leading or trailing white space"),
    ("\tghcr.io:5000", "must not have leading or trailing white space"),
    ("ghcr.io\u00a0", "must not have leading or trailing white space"),
    (".", "must not be empty"),
    ("a..b.com", "empty label"),
    (".example.com", "empty label"),
    ("a" * 64 + ".com", "longer than 63"),
    (".".join(["a" * 60] * 5), "at most 253"),
    ("under_score.com", "invalid characters"),
    ("-lead.com", "invalid characters"),
    ("trail-.com", "invalid characters"),
    ("sp ace.com", "invalid characters"),
    ("a*.example.com", "wildcard"),
    ("foo.*.example.com", "wildcard"),
    ("*.com", "top-level"),
    ("example.com:0", "out of range"),
    ("example.com:70000", "out of range"),
    ("xn--zz.example", "punycode"),
    (42, "strings"),
    (None, "strings"),
])
def test_invalid_entries_name_the_rule(text, rule):
    with pytest.raises(InvalidName, match=rule):
        parse_entry(text)


def test_domain_matches_itself_and_subdomains_label_aligned():
    m = Matcher([entry("example.com")])
    assert m.match("example.com") == Pattern("example.com")
    assert m.match("registry.example.com")
    assert m.match("a.b.c.example.com")
    assert m.match("badexample.com") is None
    assert m.match("example.com.evil.net") is None
    assert m.match("com") is None


def test_wildcard_matches_subdomains_only():
    m = Matcher([entry("*.example.com")])
    assert m.match("example.com") is None
    assert m.match("cdn.example.com") == Pattern("example.com", True)
    assert m.match("a.cdn.example.com")
    assert m.match("xexample.com") is None


def test_a_name_with_an_escape_is_never_allowed():
    """dnspython's text of a dot inside a label (``\\.``) or of a byte no host name has
    (``\\DDD``, ``\\\\``): not a host name, and ``ghcr\\.io`` is one label, not under ``io``."""
    m = Matcher([entry("ghcr.io"), entry("io"), entry("*.example.com")])
    for name in ("ghcr\\.io", "a\\.ghcr.io", "x.ghcr\\.io", "gh\\195\\169cr.io", "a\\032.ghcr.io",
                 "cdn\\.example.com", "a\\\\.example.com"):
        assert m.match(name) is None, name
    assert m.match("a_b.ghcr.io") == Pattern("ghcr.io")


def test_canonical_form_of_dns_names():
    m = Matcher([entry("Example.COM")])
    assert m.match(canonical("REGISTRY.Example.com.")) is not None


def test_idna_entry_matches_the_wire_form():
    m = Matcher([entry("bücher.example")])
    assert m.match("www.xn--bcher-kva.example")


def test_ten_thousand_entries_match_exactly():
    patterns = [entry(f"registry{i}.corp{i % 97}.example") for i in range(10_000)]
    patterns += [entry(f"*.cdn{i}.example") for i in range(100)]
    m = Matcher(patterns)
    assert len(m) == 10_100
    assert m.match("registry9999.corp9999.example") is None
    assert m.match(f"registry9999.corp{9999 % 97}.example")
    assert m.match(f"blob.registry5000.corp{5000 % 97}.example")
    assert m.match("x.cdn99.example")
    assert m.match("cdn99.example") is None
    assert m.match("registry10000.corp0.example") is None


def test_covers_and_wider():
    m = Matcher([entry("example.com"), entry("*.cdn.net"), entry("a.cdn.net")])
    assert m.covers(entry("*.x.example.com"))
    assert m.covers(entry("*.cdn.net"))
    assert m.covers(entry("b.cdn.net"))
    assert m.covers(entry("*.other.net")) is None
    assert m.wider(entry("a.cdn.net")) == Pattern("cdn.net", True)
    assert m.wider(entry("example.com")) is None
    assert m.wider(entry("*.cdn.net")) is None
