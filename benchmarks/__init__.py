"""dist_finetune's benchmarks: ``python -m benchmarks --help`` lists them (see benchmarks/README.md).

Not part of the installed package: run from the repository root, which puts this folder and
``dist_finetune`` on the path.
"""
