"""The worker: runs the model for its DP group, one ordered step at a time."""
