"""Training runs: typed stage configs and presets, run folders (status, metrics, stop flag,
checkpoints), the stage trainer (accelerate) and its data, and chains of runs."""
