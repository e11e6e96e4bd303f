"""The Prometheus series of SGLang's names (`sglang:*`, labelled `model_name`), beside Tandem's own, so that
dashboards built for SGLang work unchanged. Counters and histograms follow the same request events as
`metrics.Metrics`; gauges are set from the engine's statistics when /metrics is scraped.

- `sglang:prompt_tokens_total`, `sglang:generation_tokens_total`: tokens of admitted prompts / generated
- `sglang:num_requests_total`: requests finished
- histograms `sglang:time_to_first_token_seconds`, `sglang:inter_token_latency_seconds`,
  `sglang:e2e_request_latency_seconds`
- `sglang:num_running_reqs`, `sglang:num_queue_reqs`: running / waiting requests
- `sglang:num_used_tokens`, `sglang:token_usage`: KV tokens in use (pages x page size), and that over the pool
- `sglang:cache_hit_rate`: prefix-cache hit tokens over queried prompt tokens
- `sglang:max_total_num_tokens`: the KV pool's capacity in tokens
- `sglang:spec_accept_length`, `sglang:spec_accept_rate` (speculative decoding): mean tokens a verify pass
  emits (accepted drafts + the target's token), accepted over proposed drafts; 0 without speculation"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram


class SGLangMetrics:
    def __init__(self, registry, model_name: str, buckets: tuple[float, ...]):
        labels = ["model_name"]

        def one(metric):
            return metric.labels(model_name)

        self.prompt_tokens = one(Counter("sglang:prompt_tokens", "Prompt tokens.", labels, registry=registry))
        self.generation_tokens = one(Counter("sglang:generation_tokens", "Generated tokens.", labels,
                                             registry=registry))
        self.num_requests = one(Counter("sglang:num_requests", "Requests finished.", labels, registry=registry))
        self.ttft = one(Histogram("sglang:time_to_first_token_seconds", "Time to first token.", labels,
                                  buckets=buckets, registry=registry))
        self.itl = one(Histogram("sglang:inter_token_latency_seconds", "Time between consecutive tokens.", labels,
                                 buckets=buckets, registry=registry))
        self.e2e = one(Histogram("sglang:e2e_request_latency_seconds", "Time from arrival to the last token.",
                                 labels, buckets=buckets, registry=registry))
        gauge = lambda name, doc: one(Gauge(name, doc, labels, registry=registry))
        self.running = gauge("sglang:num_running_reqs", "Running requests.")
        self.queued = gauge("sglang:num_queue_reqs", "Requests waiting in the queue.")
        self.used_tokens = gauge("sglang:num_used_tokens", "KV cache tokens in use (whole pages).")
        self.token_usage = gauge("sglang:token_usage", "KV cache tokens in use over the pool's capacity.")
        self.cache_hit_rate = gauge("sglang:cache_hit_rate", "Prefix-cache hit tokens over queried prompt tokens.")
        self.max_tokens = gauge("sglang:max_total_num_tokens", "The KV pool's capacity in tokens.")
        self.spec_accept_length = gauge("sglang:spec_accept_length", "Mean tokens emitted per verify pass.")
        self.spec_accept_rate = gauge("sglang:spec_accept_rate", "Accepted over proposed draft tokens.")

    def refresh(self, stats: dict) -> None:
        self.running.set(stats["running"])
        self.queued.set(stats["waiting"])
        used = stats["used_pages"] * stats["page_size"]
        self.used_tokens.set(used)
        self.token_usage.set(min(stats["used_pages"] / max(stats["num_pages"], 1), 1.0))
        queried = stats.get("prefix_cache_query_tokens", 0)
        self.cache_hit_rate.set(stats.get("prefix_cache_hit_tokens", 0) / queried if queried else 0.0)
        self.max_tokens.set(stats["max_total_tokens"])
        self.spec_accept_length.set(stats.get("spec_accept_length", 0.0))
        self.spec_accept_rate.set(stats.get("spec_accept_rate", 0.0))
