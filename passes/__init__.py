"""The qpass pass library: one module per pass (``qpass passes`` lists them)."""
