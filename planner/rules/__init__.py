"""Rewrite-rule families; each module holds one family's table of named rules."""
