"""Offline trainer: dataset to calibrated, evaluated, signed model bundle."""
