"""Planner: fault incidents in, a recovery plan out (minimal restart set, replica sources,
recovery step). The decision is `core.plan`; `app.PlannerService` is the I/O shell."""

from .arrays import PlanInput
from .core import NoPlan, Policy, choose_sources, plan, plan_id_for, rebuild_groups

__all__ = ["NoPlan", "PlanInput", "Policy", "choose_sources", "plan", "plan_id_for", "rebuild_groups"]
