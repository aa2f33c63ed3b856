"""Evaluate models for the user: the report and its gates, per-layer errors, and the model summary of `inspect`
(the measuring itself lives in compressq.measure)."""
