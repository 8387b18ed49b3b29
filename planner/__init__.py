"""Planning: rewrite rules, passes, plans and the store they are kept in."""

from hypatia.planner.passes import PASSES, plan_graph
from hypatia.planner.plan import Plan, PlanFormatError, Region

__all__ = ["PASSES", "Plan", "PlanFormatError", "Region", "plan_graph"]
