"""Shared hosting: allowlist entries that let anyone's registry in.

An entry allows its domain and every name under it. Where that domain is a public suffix
(``cloudfront.net``: every CloudFront distribution), or has public suffixes under it
(``amazonaws.com`` covers ``s3.amazonaws.com``, where every S3 bucket has a name), anyone can
host a registry the entry allows. The Public Suffix List says where: Debian's copy
(``publicsuffix``), read with Debian's ``python3-publicsuffix2``. A few shared hosts the list
does not name (in Debian 12's copy) or cannot (one host name for every tenant) are added here.
"""

from __future__ import annotations

import functools
from pathlib import Path

from .names import Pattern

PSL_FILE = Path("/usr/share/publicsuffix/public_suffix_list.dat")
SHARED_HOSTS = {
    "blob.core.windows.net": "every Azure storage account",
    "pkg.dev": "every Artifact Registry repository",
    "storage.googleapis.com": "every Google Cloud Storage bucket (one host name serves them all)",
}


@functools.cache
def _list() -> tuple[frozenset[str], frozenset[str]] | None:
    """(the suffix rules, every name that has one under it), or None without the list."""
    try:
        import publicsuffix2
    except ImportError:
        return None
    if not PSL_FILE.exists():
        return None
    rules = frozenset(publicsuffix2.PublicSuffixList(psl_file=str(PSL_FILE)).tlds)
    ancestors = set()
    for rule in rules:
        labels = rule.lstrip("!").removeprefix("*.").split(".")
        ancestors.update(".".join(labels[i:]) for i in range(1, len(labels)))
    return rules, frozenset(ancestors)


def available() -> bool:
    return _list() is not None


def _is_suffix(domain: str, rules: frozenset[str]) -> bool:
    parent = domain.partition(".")[2]
    return domain in rules or (f"*.{parent}" in rules and f"!{domain}" not in rules)


def shared(pattern: Pattern) -> str | None:
    """Why the entry lets anyone's registry in, or None."""
    domain, entry = pattern.domain, pattern.to_text()
    if domain in SHARED_HOSTS:
        return f"{entry} allows {SHARED_HOSTS[domain]}: anyone can host a registry there"
    found = _list()
    if found is None:
        return None
    rules, ancestors = found
    if _is_suffix(domain, rules):
        return f"{entry} allows every site under the public suffix {domain}: anyone can host a registry there"
    if domain in ancestors:
        under = sorted(r.lstrip("!").removeprefix("*.") for r in rules if r.endswith("." + domain))[:3]
        return (f"{entry} covers public suffixes where anyone can host a registry ({', '.join(under)}, ...): "
                "allow the exact hosts instead")
    return None
