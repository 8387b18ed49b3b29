"""Hypatia: a torch.compile backend whose planning and tuning live in a per-host daemon.

This package holds the shared vocabulary only (version, configuration, canonical graphs and
keys, the wire protocol); the backend is ``hypatia.client``, the daemon ``hypatia.daemon``.
"""

__version__ = "0.1.0"
