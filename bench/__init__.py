"""Benchmarks: `make bench` prints one table of compressq vs reference, measured side by side in one run."""
