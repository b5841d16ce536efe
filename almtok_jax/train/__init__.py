"""Training: config tree, mesh and sharding rules, grain input pipeline, train state and step, orbax
checkpoints, logging. The CLI is ``train.py`` at the repository root."""
