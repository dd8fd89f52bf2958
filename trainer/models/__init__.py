"""Trainer models: each a pure, exportable torch module plus the fitting beside it."""
