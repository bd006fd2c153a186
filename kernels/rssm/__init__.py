"""RSSM ensemble rollout: one launch for all members and all steps (see rollout.py)."""
