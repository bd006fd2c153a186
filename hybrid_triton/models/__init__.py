"""Models shipped with the toolkit (GPT-2 family) for the trainer, planner and suites."""
