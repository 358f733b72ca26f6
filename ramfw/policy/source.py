"""Where the policy comes from: a file, or an HTTPS URL polled with ETag, and the cache.

The cache holds the last policy that validated; it is what is enforced when the source is
unreachable or serves something invalid. Nothing here ever yields "no policy": ``load``
falls back to the cache, then to Docker Hub only.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .. import policy as policy_mod
from ..config import Config
from ..errors import PolicyError
from . import Policy


def load(config: Config, path: str | None = None, fallback: bool = False) -> tuple[Policy, str]:
    """The policy to enforce and where it came from.

    An explicit path must load. The configured source (a file, or a URL whose poller keeps
    the cache current) is cached whenever it loads; when it is missing — or, with
    ``fallback`` (starting up), invalid — the last good cached copy is enforced, then the
    restrictive default (Docker Hub only): never open because a policy is missing or bad.
    A reload passes no ``fallback``, so a bad file is refused and the policy in force stays.
    """
    limit = config.policy.max_registries
    if path is not None:
        return policy_mod.from_file(path, limit), path
    source, cache = config.policy.source, Path(config.policy.cache)
    problem = f"{source} has not been read"
    if not is_url(source) and Path(source).exists():
        try:
            policy = policy_mod.from_file(source, limit)
        except PolicyError as err:
            if not fallback:
                raise
            problem = f"{source} is invalid: {err}"
        else:
            _cache(Path(source), cache)
            return policy, source
    if cache.exists():
        return policy_mod.from_file(cache, limit), f"{cache}, the last good copy ({problem})"
    return policy_mod.default(), f"built-in default, Docker Hub only ({problem})"


def _cache(source: Path, cache: Path) -> None:
    try:
        text = source.read_text(encoding="utf-8")
        if not cache.exists() or cache.read_text(encoding="utf-8") != text:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(cache)
    except OSError:
        pass  # a cache that cannot be written costs only the fallback


def url_source(config: Config) -> "UrlSource | None":
    """The poller of the configured source, when it is a URL."""
    if not is_url(config.policy.source):
        return None
    p = config.policy
    return UrlSource(p.source, p.cache, p.ca_file, p.max_registries)


def is_url(source: str) -> bool:
    return source.startswith(("https://", "http://"))


@dataclass
class Fetch:
    changed: bool
    text: str = ""
    etag: str = ""


def fetch(url: str, etag: str = "", ca_file: str = "", timeout: float = 10.0) -> Fetch:
    """GET the policy; ``changed`` is False on 304 Not Modified. Raises OSError when unreachable."""
    request = urllib.request.Request(url, headers={"If-None-Match": etag} if etag else {})
    context = ssl.create_default_context(cafile=ca_file or None) if url.startswith("https://") else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return Fetch(True, response.read(1 << 24).decode("utf-8"), response.headers.get("ETag", ""))
    except urllib.error.HTTPError as err:
        if err.code == 304:
            return Fetch(False, etag=etag)
        raise OSError(f"{url}: HTTP {err.code}") from None
    except (urllib.error.URLError, UnicodeDecodeError, ValueError) as err:
        raise OSError(f"{url}: {getattr(err, 'reason', err)}") from None


class UrlSource:
    """Polls a policy URL; validates before caching, so the cache only holds good policies."""

    def __init__(self, url: str, cache: str, ca_file: str, max_registries: int):
        self.url, self.cache, self.ca_file, self.max_registries = url, Path(cache), ca_file, max_registries
        self.etag = self._cached_etag()
        self.last_error = ""

    def _cached_etag(self) -> str:
        try:
            return json.loads(self.cache.with_suffix(".meta").read_text()).get("etag", "")
        except (OSError, ValueError):
            return ""

    def refresh(self) -> bool:
        """One poll; True when a new valid policy was cached. Errors are kept in last_error."""
        try:
            result = fetch(self.url, self.etag if self.cache.exists() else "", self.ca_file)
        except OSError as err:
            self.last_error = f"policy source unreachable, the cached policy stays: {err}"
            return False
        if not result.changed:
            self.last_error = ""
            return False
        try:
            policy_mod.from_text(result.text, self.max_registries, self.url)
        except PolicyError as err:
            self.last_error = f"the policy source served an invalid policy, the cached one stays: {err}"
            return False
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache.with_suffix(".tmp")
        tmp.write_text(result.text)
        tmp.replace(self.cache)
        self.cache.with_suffix(".meta").write_text(json.dumps({"etag": result.etag, "url": self.url}))
        self.etag, self.last_error = result.etag, ""
        return True
