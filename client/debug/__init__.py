"""Hypatia's debug toolkit: the artifacts folder of every compile (``HYPATIA_ARTIFACTS``)."""
