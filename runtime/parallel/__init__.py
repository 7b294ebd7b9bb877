"""Tensor parallelism: checkpoint sharding rules (and, later, rank launch and parallel layers)."""
