"""Parallel state (process groups), layer partitions and stage-to-stage communication."""
