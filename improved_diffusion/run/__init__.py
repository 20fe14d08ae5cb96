"""A training run: built from its options, its folder (lock, config.json, checkpoints), mixed precision and EMAs."""
