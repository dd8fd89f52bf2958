"""Operator tooling: push signed models to running agents."""
