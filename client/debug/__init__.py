"""Hypatia's debug toolkit."""

from hypatia.debug.folder import process_folder
from hypatia.debug.minify import DoesNotFail, Minified, minify
from hypatia.debug.repro import write_repro
from hypatia.debug.triggers import minify_model

__all__ = ["DoesNotFail", "Minified", "minify", "minify_model", "process_folder", "write_repro"]
