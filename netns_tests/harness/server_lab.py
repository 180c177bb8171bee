"""The server agents' harness moved to orchestrator/lab/server_lab.py (the demo runs it too); the
netns tests may import it from here as before."""

from orchestrator.lab.server_lab import AgentLab, ServerLab, server_config

__all__ = ["AgentLab", "ServerLab", "server_config"]
