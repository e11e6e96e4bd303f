"""The last stage's sampling: params, penalties, filters, logprobs, greedy argmax and the sampler itself."""
