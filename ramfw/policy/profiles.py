"""What the well-known registries redirect to: the domains a pull touches besides the registry.

Docker RAM leaves admins to discover these by trial and error; ramfw knows them and says
exactly what to add to the allowlist. Each profile matches a registry host name and names the
domains (in allowlist syntax) that pulls from it also need.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import hosting
from .names import Matcher, Pattern, parse_entry

DOCKER_HUB_HOSTS = (
    "registry-1.docker.io",
    "auth.docker.io",
    "index.docker.io",
    "production.cloudflare.docker.com",
    "production.cloudfront.docker.com",
    "docker-images-prod.6aa30f8b08e16409b46e0173d6de2f56.r2.cloudflarestorage.com",
    "hub.docker.com",
    "login.docker.com",
    "auth.docker.com",
)


@dataclass(frozen=True)
class Profile:
    name: str
    host: re.Pattern[str]
    needs: tuple[str, ...]
    note: str = ""

    def needed(self, registry: str) -> tuple[str, ...]:
        found = self.host.fullmatch(registry)
        if not found:
            return ()
        return tuple(need.format(**found.groupdict()) for need in self.needs)


PROFILES = (
    Profile("Docker Hub", re.compile(r"(?:registry-1\.|index\.)?docker\.io"), DOCKER_HUB_HOSTS[1:6]),
    Profile(
        "Amazon ECR",
        re.compile(r"[0-9]{12}\.dkr\.ecr(?:-fips)?\.(?P<region>[a-z0-9-]+)\.amazonaws\.com"),
        ("prod-{region}-starport-layer-bucket.s3.{region}.amazonaws.com",),
    ),
    Profile("Amazon ECR Public", re.compile(r"public\.ecr\.aws"), ("*.cloudfront.net",)),
    Profile("Google Container Registry", re.compile(r"(?:[a-z]+\.)?gcr\.io"), ("storage.googleapis.com",)),
    Profile(
        "registry.k8s.io",
        re.compile(r"registry\.k8s\.io"),
        ("*.pkg.dev",),
        "it may also redirect to prod-registry-k8s-io-<region>.s3.dualstack.<region>.amazonaws.com",
    ),
    Profile("Azure Container Registry", re.compile(r"[a-z0-9]+\.azurecr\.io"), ("*.blob.core.windows.net",)),
    Profile("Microsoft Artifact Registry", re.compile(r"mcr\.microsoft\.com"), ("*.data.mcr.microsoft.com",)),
    Profile("GitHub Container Registry", re.compile(r"ghcr\.io"), ("pkg-containers.githubusercontent.com",)),
    Profile("GitLab.com", re.compile(r"registry\.gitlab\.com"), ("cdn.registry.gitlab-static.net",)),
    Profile(
        "Quay",
        re.compile(r"quay\.io"),
        ("cdn.quay.io", "cdn01.quay.io", "cdn02.quay.io", "cdn03.quay.io",
         "quayio-production-s3.s3.amazonaws.com"),
    ),
)


@dataclass(frozen=True)
class Gap:
    """An allowed registry whose redirect domains are not all allowed."""

    registry: str
    profile: str
    missing: tuple[str, ...]
    note: str

    def to_text(self) -> str:
        text = f"pulls from {self.registry} will fail: also allow {', '.join(self.missing)}"
        if any(hosting.shared(parse_entry(need).pattern) for need in self.missing):
            text += (" (shared hosting: that lets anyone's registry in; better, allow the exact host your pulls "
                     "use, which ramfw's block message names)")
        return f"{text} ({self.note})" if self.note else text


def gaps(registries: list[Pattern], matcher: Matcher) -> list[Gap]:
    """For each registry with a known profile, the redirect domains the allowlist lacks."""
    found = []
    for registry in registries:
        if registry.subdomains_only:
            continue
        for profile in PROFILES:
            missing = tuple(
                need for need in profile.needed(registry.domain)
                if matcher.covers(parse_entry(need).pattern) is None
            )
            if missing:
                found.append(Gap(registry.domain, profile.name, missing, profile.note))
    return found
