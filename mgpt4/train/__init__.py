"""Training: one DeepSpeed engine for both stages; a stage is a recipe."""
