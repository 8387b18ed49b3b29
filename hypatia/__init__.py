"""Hypatia: a torch.compile backend whose planning and tuning live in a per-host daemon.

This package holds the shared vocabulary only (version, configuration, canonical graphs and
keys, the wire protocol); the backend is ``hypatia.client``, the daemon ``hypatia.daemon``.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

# In a source checkout the subpackages live beside this folder (client/, daemon/, planner/,
# kernels/, and client/debug/ and client/device/ for ``hypatia.debug`` and ``hypatia.device``;
# pyproject maps them with package-dir). When this folder is imported from the checkout itself
# -- a script run from the repository root with a non-editable install, or no install -- let
# ``hypatia.client`` and the others resolve to those folders.
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "client" / "__init__.py").is_file():
    __path__ += [str(_root), str(_root / "client")]  # type: ignore[name-defined]  # noqa: F821
del _Path, _root
