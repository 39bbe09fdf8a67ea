"""Proxy experiments: Optuna sweeps, coordinate checks and LR-transfer checks, with their definitions."""
