"""RSSM ensemble rollout: one launch for all members and all steps (see rollout.py)."""

from .rollout import (
    RolloutGraph,
    RolloutResult,
    RSSMFeedback,
    RSSMWeights,
    default_split,
    default_variant,
    gru_cell_batched,
    make_workspace,
    rssm_rollout,
    rssm_rollout_ref,
)

__all__ = [
    "RSSMFeedback",
    "RSSMWeights",
    "RolloutGraph",
    "RolloutResult",
    "default_split",
    "default_variant",
    "gru_cell_batched",
    "make_workspace",
    "rssm_rollout",
    "rssm_rollout_ref",
]
