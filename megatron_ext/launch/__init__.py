"""Launch at scale: a 128k parallelism/memory planner, SLURM rank mapping and sbatch rendering.

Imports no megatron. See docs/launch.md for the formulas, their sources and how to run on a cluster.
"""
