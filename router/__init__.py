"""router-cluster: the router replica service."""

__version__ = "0.1.0"
