"""Where the policy comes from: a file, or an HTTPS URL polled politely, and the cache.

The cache holds the last policy that was accepted (``trust.accept``: signature, validity,
expiry, version), with its signature (``.minisig``), what the origin said of it (``.meta``:
ETag, Last-Modified, when it last answered) and the highest version accepted (``.accepted``,
the rollback floor: it survives restarts, like the cache, in ``/var/lib/ramfw``). It is what
is enforced when the source is unreachable or serves something refused. Nothing here ever
yields "no policy": ``load`` falls back to the cache, then to Docker Hub only.

A URL is ``https://``; ``http://`` only with ``policy.signatures = require`` (the signature
is then what is trusted, not the path). A redirect to another scheme is refused.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..config import Config, PolicySettings
from ..errors import PolicyError
from . import Policy, default, schedule, trust

SIGNATURE_SUFFIX = ".minisig"
MAX_SIZE = 1 << 24


def load(config: Config, path: str | None = None, fallback: bool = False,
         polled: "UrlSource | None" = None) -> tuple[Policy, str]:
    """The policy to enforce and where it came from.

    An explicit path must be accepted (it is checked like any source, but neither cached nor
    raising the floor: it is root's one-off choice). The configured source (a file, or a URL
    whose poller keeps the cache current) is cached whenever it is accepted; when it is
    missing — or, with ``fallback`` (starting up), refused — the last good cached copy is
    enforced, then the restrictive default (Docker Hub only): never open because a policy is
    missing, bad, unsigned, replayed or expired. A reload passes no ``fallback``, so a refused
    file raises and the policy in force stays. ``polled``: the URL's poller; what it accepted
    last is taken as it is (reading the cache again could meet the poller writing it).
    """
    settings, now = config.policy, time.time()
    cache = Path(settings.cache)
    if path is not None:
        return _accept_file(Path(path), settings, read_floor(cache), now), path
    source = settings.source
    url_error = polled.last_error if polled is not None else ""
    if polled is not None and polled.accepted is not None:
        where = f"{source} (cached in {cache})"
        return polled.accepted, where if not url_error else f"{where}; its last poll failed: {url_error}"
    if is_url(source):
        problem = url_error or f"{source} has not answered yet"
    else:
        problem = f"{source} is missing"
        if Path(source).exists():
            try:
                policy = _accept_file(Path(source), settings, read_floor(cache), now)
            except PolicyError as err:
                if not fallback:
                    raise
                problem = f"{source} is refused: {err}"
            else:
                _keep(Path(source).read_bytes(), _read_signature(Path(source)), cache, policy)
                return policy, source
    if cache.exists():
        try:
            policy = _accept_file(cache, settings, read_floor(cache), now, last_good=True)
        except PolicyError as err:
            return default(), f"built-in default, Docker Hub only (the cached copy is refused: {err}; {problem})"
        if is_url(source) and not url_error and meta(cache, source).get("checked_at"):
            return policy, f"{source} (cached in {cache})"
        return policy, f"{cache}, the last good copy ({problem})"
    return default(), f"built-in default, Docker Hub only ({problem})"


def describe(settings: PolicySettings) -> list[str]:
    """For ``ramfw doctor``: where the policy comes from, how it is trusted, what that leaves open."""
    keys = ", ".join(k.key_id for k in settings.keys())
    lines = [f"policy source: {settings.source}" + (
        f", polled every {settings.refresh_interval} s +/- {int(settings.refresh_jitter * 100)}%, red after "
        f"{settings.max_staleness} s without an answer" if is_url(settings.source) else "")]
    if settings.signatures == "off":
        lines.append("policy signatures: off: whoever can change the source (the file, or the origin's content) "
                     "sets the policy; fleets use policy.signatures = \"require\" with policy.trusted_keys")
    else:
        lines.append(f"policy signatures: {settings.signatures}, trusted keys {keys}; versions never go back "
                     f"(highest accepted: {read_floor(Path(settings.cache)).version or 'none yet'})")
    return lines


def _read_signature(path: Path) -> str | None:
    try:
        return Path(str(path) + SIGNATURE_SUFFIX).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _accept_file(path: Path, settings: PolicySettings, floor: trust.Floor, now: float, last_good=False) -> Policy:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PolicyError(f"{path}: cannot read the policy: {err.strerror}") from None
    return trust.accept(data, _read_signature(path), settings, floor, now, str(path), last_good)


def read_floor(cache: Path) -> trust.Floor:
    try:
        data = json.loads(cache.with_suffix(".accepted").read_text())
        return trust.Floor(int(data.get("version", 0)), str(data.get("sha256", "")))
    except (OSError, ValueError, TypeError, AttributeError):
        return trust.Floor()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _keep(data: bytes, signature_text: str | None, cache: Path, policy: Policy) -> None:
    """Cache an accepted policy with its signature, and raise the floor to its version."""
    try:
        if not cache.exists() or cache.read_bytes() != data:
            _write(cache, data)
        sig = Path(str(cache) + SIGNATURE_SUFFIX)
        if signature_text is not None:
            _write(sig, signature_text.encode("utf-8"))
        else:
            sig.unlink(missing_ok=True)
        floor = read_floor(cache)
        if policy.version > floor.version or (policy.version == floor.version and not floor.sha256):
            _write(cache.with_suffix(".accepted"), json.dumps({
                "version": policy.version, "sha256": trust.digest(data), "signer": policy.signer,
                "accepted_at": time.time()}).encode())
    except OSError:
        pass  # a cache that cannot be written costs only the fallback


def meta(cache: Path, url: str) -> dict:
    """What the origin said of the cached copy (ETag, Last-Modified, checked_at), if it is this URL's."""
    try:
        data = json.loads(cache.with_suffix(".meta").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("url") == url else {}


def url_source(config: Config) -> "UrlSource | None":
    """The poller of the configured source, when it is a URL."""
    if not is_url(config.policy.source):
        return None
    return UrlSource(config.policy)


def is_url(source: str) -> bool:
    return source.startswith(("https://", "http://"))


def signature_url(url: str) -> str:
    """minisign's convention: the signature of ``policy.json`` is ``policy.json.minisig``."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path + SIGNATURE_SUFFIX))


@dataclass
class Fetch:
    changed: bool
    body: bytes = b""
    etag: str = ""
    last_modified: str = ""


class FetchError(OSError):
    """No usable answer; ``status`` is the HTTP status if there was one, ``retry_after`` the
    seconds the origin asked for."""

    def __init__(self, message: str, status: int = 0, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class _SameScheme(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only within the scheme it started with: an HTTPS source is never
    handed over to plain HTTP (or the reverse)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urllib.parse.urlsplit(req.full_url).scheme, urllib.parse.urlsplit(newurl).scheme
        if old != new:
            raise urllib.error.URLError(f"a redirect from {old}:// to {newurl} is refused (another scheme)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, etag: str = "", last_modified: str = "", ca_file: str = "", timeout: float = 10.0,
          allow_http: bool = False) -> Fetch:
    """GET with If-None-Match / If-Modified-Since; ``changed`` is False on 304 Not Modified.
    Raises FetchError when there is no usable answer."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme != "https" and not (scheme == "http" and allow_http):
        raise FetchError(f"{url}: refused: a policy source is https:// (http:// only with "
                         "policy.signatures = require)")
    headers = {"User-Agent": f"ramfw/{__version__}"}  # an origin's operator sees who polls, and which release
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    handlers: list = [_SameScheme()]
    if scheme == "https":
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca_file or None)))
    opener = urllib.request.build_opener(*handlers)
    deadline = time.monotonic() + 3 * timeout  # a body trickled byte by byte ends too
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            body = b""
            while len(body) <= MAX_SIZE:
                chunk = response.read(min(65536, MAX_SIZE + 1 - len(body)))
                if not chunk:
                    break
                body += chunk
                if time.monotonic() > deadline:
                    raise FetchError(f"{url}: too slow (more than {3 * timeout:g} s)")
            if len(body) > MAX_SIZE:
                raise FetchError(f"{url}: larger than {MAX_SIZE} bytes")
            return Fetch(True, body, response.headers.get("ETag", ""), response.headers.get("Last-Modified", ""))
    except urllib.error.HTTPError as err:
        if err.code == 304:
            return Fetch(False, etag=etag, last_modified=last_modified)
        try:
            wait = schedule.retry_after(err.headers.get("Retry-After") if err.headers else None, time.time())
        except (ValueError, OverflowError):  # a Retry-After no one can read: the backoff decides
            wait = None
        raise FetchError(f"{url}: HTTP {err.code}", err.code, wait) from None
    except (OSError, http.client.HTTPException, ValueError) as err:  # URLError, SSLError, resets, bad answers
        raise FetchError(f"{url}: {getattr(err, 'reason', err) or type(err).__name__}") from None


class UrlSource:
    """Polls a policy URL; checks (``trust.accept``) before caching, so the cache only holds
    accepted policies. ``refresh`` is True only when a policy other than the cached one was
    accepted: an origin without ETag that serves the same bytes again changes nothing."""

    def __init__(self, settings: PolicySettings):
        self.settings = settings
        self.url, self.cache, self.ca_file = settings.source, Path(settings.cache), settings.ca_file
        self.last_error = ""
        self.outcome = "not polled yet"
        self.retry_after: float | None = None
        self.failed = False  # the last poll got no usable answer (counts for the backoff)
        self.checked_at: float | None = meta(self.cache, self.url).get("checked_at")
        self.accepted: Policy | None = None

    def refresh(self, now: float | None = None) -> bool:
        """One poll; True when a new policy was accepted and cached. Errors are kept in last_error."""
        now = time.time() if now is None else now
        known = meta(self.cache, self.url) if self._cache_acceptable(now) else {}
        self.retry_after, self.failed = None, False
        allow_http = self.settings.signatures == "require"
        try:
            result = fetch(self.url, known.get("etag", ""), known.get("last_modified", ""), self.ca_file,
                           allow_http=allow_http)
            if result.changed and trust.digest(result.body) != known.get("sha256"):
                signature_text = self._signature(allow_http)
        except FetchError as err:
            self.failed, self.retry_after = True, err.retry_after
            self.last_error = f"policy source unreachable, the cached policy stays: {err}"
            self.outcome = f"no answer: {err}"
            return False
        if not result.changed or trust.digest(result.body) == known.get("sha256"):
            self._checked(known, result, now)
            self.last_error = ""
            self.outcome = "unchanged (304 Not Modified)" if not result.changed else "unchanged (the same content)"
            return False
        try:
            policy = trust.accept(result.body, signature_text, self.settings, read_floor(self.cache), now, self.url)
        except PolicyError as err:
            self.last_error = f"the policy source served an invalid policy or one that is refused, the cached one " \
                              f"stays: {err}"
            self.outcome = f"refused: {err}"
            return False
        _keep(result.body, signature_text, self.cache, policy)
        self._checked({}, result, now, trust.digest(result.body))
        self.accepted, self.last_error = policy, ""
        signed = f" signed by {policy.signer}" if policy.signer else " unsigned"
        self.outcome = f"new policy accepted: version {policy.version}{signed}"
        return True

    def _cache_acceptable(self, now: float) -> bool:
        """Whether the cached copy passes the checks today. When it does not (signed by a key
        since removed from the configuration, say, and re-signed at the origin with the new
        one), the poll asks without validators and takes nothing for "the same": a 304, or
        the same bytes, would otherwise leave the VM on the default for good."""
        try:
            _accept_file(self.cache, self.settings, read_floor(self.cache), now, last_good=True)
        except PolicyError:
            return False
        return True

    def _signature(self, allow_http: bool) -> str | None:
        if self.settings.signatures == "off":
            return None
        try:
            return fetch(signature_url(self.url), ca_file=self.ca_file, allow_http=allow_http).body.decode(
                "utf-8", "replace")
        except FetchError as err:
            if err.status in (404, 410):
                return None  # unsigned: trust.accept says what that means under the mode
            raise

    def _checked(self, known: dict, result: Fetch, now: float, sha256: str = "") -> None:
        """The origin answered with what is cached: remember its validators and when."""
        self.checked_at = now
        data = {**known, "url": self.url, "checked_at": now}
        if result.changed or sha256:
            data.update(etag=result.etag, last_modified=result.last_modified)
        if sha256:
            data["sha256"] = sha256
        try:
            _write(self.cache.with_suffix(".meta"), json.dumps(data).encode())
        except OSError:
            pass

    def due(self, now: float) -> bool:
        """At start-up: fetch now, or is the cached copy younger than one interval? A fleet's
        VMs restarting together (a Docker Desktop restart, WSL2's idle shutdown) then leave
        the origin alone, and poll at their random phase instead."""
        fresh = self.checked_at is not None and 0 <= now - self.checked_at < self.settings.refresh_interval
        return not (fresh and self._cache_acceptable(now))

    def stale(self, now: float) -> str:
        return schedule.staleness(self.checked_at, now, self.settings.max_staleness)
