"""mplsorch: session-label load balancing on the Linux kernel's MPLS forwarding."""

__version__ = "0.1.0"
