"""Benchmarks of dist_finetune: ``python -m benchmarks.<module> --help``."""
