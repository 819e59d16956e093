"""The worker's environment, as given by its launcher (FLASHRECOVERY_AGENT_*). The model lives
in shared/settings.py beside the services' settings: the sidecar sets what the agent reads, and
both sides take the names from there."""

from flashrecovery.shared.settings import DEFAULT_JOB_ID, AgentSettings, agent_env

__all__ = ["DEFAULT_JOB_ID", "AgentSettings", "agent_env"]
