"""FlashRecovery in-trainer agent: keeps a training process alive through failures elsewhere.

Public API:
- ``RecoveryAgent`` (agent.py): the lifecycle class a training loop uses.
- ``channel``: the sidecar <-> worker message models and codec (a shared contract).
- ``decide_recovery``, ``RecoveryDecision``, ``plan_transfers`` (commit_rule.py): pure decisions.
- ``GroupFactory``, ``GlooGroupFactory``, ``NcclGroupFactory``, ``Comm``, ``Interrupted``
  (groups.py): per-generation groups and interruptible collectives.
"""

from .commit_rule import InconsistentReports, RecoveryDecision, decide_recovery, plan_transfers

__all__ = ["InconsistentReports", "RecoveryDecision", "decide_recovery", "plan_transfers"]
