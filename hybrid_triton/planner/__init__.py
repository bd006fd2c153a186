"""VRAM-budget planner: per-phase, per-component estimates and what fits a GPU."""
