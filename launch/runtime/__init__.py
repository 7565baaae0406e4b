"""The training runtime: config, the loop, engines, checkpoints, EMA, distributed helpers, signals, metrics,
stage assembly from a config, the export-directory contract and the precompute job."""
