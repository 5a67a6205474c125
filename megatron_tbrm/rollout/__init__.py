"""Rollouts: the vLLM server process, the client that turns prompts into trajectories, and
the worker extension through which the trainer's weights reach the server."""
from megatron_tbrm.rollout.client import RolloutClient, Trajectory
from megatron_tbrm.rollout.server import RolloutServerError, VLLMServer

__all__ = ["RolloutClient", "RolloutServerError", "Trajectory", "VLLMServer"]
