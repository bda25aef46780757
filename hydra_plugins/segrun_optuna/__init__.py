"""segrun's Hydra sweeper around Optuna >= 4 (``hydra/sweeper=optuna``, see ``optuna_sweeper``)."""
