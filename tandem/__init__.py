"""Tandem: a pipeline- and tensor-parallel LLM inference engine."""
