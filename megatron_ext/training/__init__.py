"""Training: the loop on megatron-core (train.py), its `train` command (cli.py) and where its numbers go (metrics.py)."""
