"""Integrations of MC checkpoints with other engines. Nothing here is imported by ``import optimum_mc``."""
