"""The training loop and what it leans on: checkpoints, distributed helpers, logging, prediction."""
