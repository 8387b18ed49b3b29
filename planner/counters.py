"""Process-wide counters for the planner (rules fired, passes run); stats only read them."""

from collections import Counter

counters: Counter = Counter()
