"""The experiment: the study package, its statistics, and the demo (one small study)."""
