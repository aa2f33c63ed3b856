"""Graph structure: queries (index), edits, the pass contract and the import-time normalization."""
