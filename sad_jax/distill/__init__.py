"""The distillation maths: span-masked losses, objectives by name, curriculum stages."""
