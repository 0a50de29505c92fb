"""Typed configuration (the module moved to rlhf_dist/config/groups.py; the next commit splits it)."""

from rlhf_dist.config.groups import *  # noqa: F403
