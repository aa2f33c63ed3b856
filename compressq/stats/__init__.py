"""Statistics over a model run on data: streaming observers and the one collection loop."""
