"""Measuring, shared by quantize, prune and evaluate: output agreement metrics (metrics.py), latency by thread CPU
time (latency.py), which output carries the task and how it is scored (task.py), speed decisions (speed.py) and
decode-step feeds for KV-cache decoders (decode.py)."""
