"""Building blocks of the models: parallel linear layers, embeddings, norms, rotary, attention,
Gated DeltaNet and MoE. Each parameterised layer owns the `weight_loader` that shards on load."""
