"""Evaluation protocols: accuracy against budget on the built-in tasks, SAMSum and Rouge."""
