"""Calibration: data sources, the layer-by-layer driver, hooks and per-expert factors."""

from .data import calibration_batches, describe_source

__all__ = ["calibration_batches", "describe_source"]
