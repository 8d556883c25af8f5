"""Fault and hostile-input tests against a real served pipeline (one Ray Serve cluster per module)."""
