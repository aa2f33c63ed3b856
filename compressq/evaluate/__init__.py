"""Run models and measure them: accuracy, agreement, latency, size; the report and its gates."""
