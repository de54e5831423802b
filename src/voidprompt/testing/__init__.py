"""Helpers for tests and benchmarks: tiny models and fake checkpoints. Not used at run time."""
