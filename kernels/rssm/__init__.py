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
from .rollout_folded import FoldedWeights, fold_weights

__all__ = [
    "FoldedWeights",
    "RSSMFeedback",
    "RSSMWeights",
    "RolloutGraph",
    "RolloutResult",
    "default_split",
    "default_variant",
    "fold_weights",
    "gru_cell_batched",
    "make_workspace",
    "rssm_rollout",
    "rssm_rollout_ref",
]
