"""Measuring: which output carries the task (task.py) and speed decisions by CPU time (speed.py)."""
