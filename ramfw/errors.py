"""One error root for everything ramfw reports to a user.

Each subclass carries the exit code the CLI uses for it; its message states the rule that
was broken and what is allowed, in one or two lines.
"""


class RamfwError(Exception):
    """Base of every error ramfw expects and explains."""

    exit_code = 1


class PolicyError(RamfwError):
    """The organization policy is malformed; nothing of it is applied."""

    exit_code = 2


class ConfigError(RamfwError):
    """The local configuration is malformed; nothing of it is applied."""

    exit_code = 2


class KernelError(RamfwError):
    """The kernel lacks something ramfw cannot enforce without."""

    exit_code = 3


class NftablesError(RamfwError):
    """libnftables refused a transaction; the kernel state is as it was before it."""

    exit_code = 4


class DaemonError(RamfwError):
    """The daemon could not be reached or refused a request."""

    exit_code = 5


class ResourceBusy(RamfwError):
    """Something ramfw must own is held by another program (a queue, a log group)."""

    exit_code = 7


class NotRoot(RamfwError):
    """A command that changes or reads the kernel's state was run without root."""

    exit_code = 6


class InvalidReference(RamfwError):
    """An image reference given to ``ramfw check`` is not one the engine would pull."""

    exit_code = 2


def require_root(what: str) -> None:
    import os

    if os.geteuid() != 0:
        raise NotRoot(f"{what} needs root (CAP_NET_ADMIN)")
