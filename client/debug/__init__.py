"""The debug toolkit: artifacts of every compile, KernelDiff, the minifier, reports."""
