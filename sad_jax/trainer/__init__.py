"""The trainer: meshes and rules (sharding), the pure train/eval steps (step), orbax
checkpoints, metrics, the per-chip memory plan, and train_and_evaluate (train)."""
