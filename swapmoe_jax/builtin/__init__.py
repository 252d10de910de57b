"""The built-in model: its synthetic tasks, its training, the shipped checkpoint and the demo model."""
