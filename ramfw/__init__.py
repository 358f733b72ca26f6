"""ramfw: a kernel-level registry firewall for the Linux VM that runs the container engine."""

# The release, named once: pyproject.toml, the Debian package (scripts/build-deb), the image
# (scripts/build-image), `ramfw --version`, status and the poller's User-Agent read it from here;
# docs/CHANGELOG.md names what each release changed.
__version__ = "0.2.0"
