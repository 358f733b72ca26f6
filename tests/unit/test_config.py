import pytest

from ramfw import config
from ramfw.errors import ConfigError


def test_defaults_work_without_a_file():
    c = config.from_text("")
    assert c.enforcement.mode == "enforce" and c.enforcement.scope == ("engine",)
    assert c.enforcement.table == "ramfw" and c.policy.max_registries == 100
    assert c.dns.ttl_min <= c.dns.ttl_max


def test_settings_are_read():
    c = config.from_text("""
[policy]
source = "/srv/policy.json"
max_registries = 10000
[enforcement]
mode = "audit"
scope = ["engine", "host"]
registry_ports = [443]
mark = 0x100
mark_mask = 0xff00
table = "ramfw_test"
[dns]
trusted_resolvers = ["192.0.2.53", "2001:db8::53"]
ttl_min = 5
[daemon]
run_dir = "/tmp/x"
""", "t.toml")
    assert c.policy.max_registries == 10000 and c.enforcement.mode == "audit"
    assert c.enforcement.scope == ("engine", "host") and c.enforcement.registry_ports == (443,)
    assert c.enforcement.mark == 0x100 and c.dns.trusted_resolvers == ("192.0.2.53", "2001:db8::53")
    assert c.daemon.socket == "/tmp/x/control.sock"


def test_a_single_scope_string_is_accepted():
    assert config.from_text('[enforcement]\nscope = "host"').enforcement.scope == ("host",)


@pytest.mark.parametrize("text, message", [
    ("[enforcement\n", "not valid TOML"),
    ("[firewall]\n", "unknown section [firewall]"),
    ("[enforcement]\nmod = 'audit'", "no setting 'mod'"),
    ("[enforcement]\nmode = 'block'", "enforcement.mode is 'block'"),
    ("[enforcement]\nscope = ['everything']", "scope 'everything' is unknown"),
    ("[enforcement]\nregistry_ports = [0]", "not a port"),
    ("[enforcement]\nregistry_ports = ['443']", "is not a int"),
    ("[enforcement]\nmark = 0", "32-bit"),
    ("[enforcement]\nmark = 0x1\nmark_mask = 0xff00", "outside"),
    ("[enforcement]\ntable = 'a b'", "enforcement.table"),
    ("[dns]\nttl_min = 100\nttl_max = 10", "ttl_min"),
    ("[dns]\nttl_min = '30'", "must be a int"),
    ("[dns]\ntrusted_resolvers = ['dns.example']", "not an IP address"),
    ("[policy]\nmax_registries = 0", "positive"),
    ("policy = 3", "must be a table"),
])
def test_invalid_config_is_a_clear_error(text, message):
    with pytest.raises(ConfigError) as err:
        config.from_text(text, "t.toml")
    assert message in str(err.value) and "t.toml" in str(err.value)


def test_load_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "nope.toml")


def test_metrics_settings_are_checked():
    import pytest

    from ramfw import config as config_mod
    from ramfw.errors import ConfigError

    good = config_mod.from_text('[metrics]\ntextfile = "/var/lib/node_exporter/ramfw.prom"\nlisten = "[::1]:9541"\n')
    assert good.metrics.listen == "[::1]:9541" and good.metrics.interval == 15
    for bad, says in (('textfile = "ramfw.prom"', "absolute path"), ('textfile = "/tmp/ramfw.txt"', ".prom"),
                      ('listen = "localhost:9541"', "not address:port"), ("interval = 0", "positive"),
                      ('port = 9541', "no setting")):
        with pytest.raises(ConfigError, match=says):
            config_mod.from_text(f"[metrics]\n{bad}\n")
