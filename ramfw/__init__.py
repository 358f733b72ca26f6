"""ramfw: a kernel-level registry firewall for the Linux VM that runs the container engine."""

__version__ = "0.1.0"
