"""Serving metrics in the Prometheus text format, as the HTTP server's /metrics route answers them.

Latency histograms (time to first token, gaps between tokens, whole-request latency) and finish counters are fed
every RequestOutput on the event loop's thread; `Metrics.render` adds the engine's own gauges and counters
(`EngineStats`: batch sizes, KV-cache use, token totals, prefix-cache hits, preemptions) and writes the
exposition text, every sample named `nanostack:...` and labelled with the served model's name.
"""
import bisect
from collections import Counter

from nanostack.serving.engine import RequestOutput

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0, 20.0, 40.0, 80.0)
FINISH_REASONS = ("stop", "length", "abort", "error")


class Histogram:
    """A Prometheus histogram: counts per upper bound, plus the sum and count of every observation."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        """Count one value in the first bucket whose upper bound is >= value."""
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.sum += value
        self.count += 1

    def samples(self, name: str, labels: str) -> list[str]:
        """Sample lines: cumulative counts per bound (le), then +Inf, the sum and the count."""
        lines, cumulative = [], 0
        for bound, count in zip(self.buckets, self.counts):
            cumulative += count
            lines.append(f'{name}_bucket{{{labels},le="{bound}"}} {cumulative}')
        lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        return lines + [f"{name}_sum{{{labels}}} {self.sum!r}", f"{name}_count{{{labels}}} {self.count}"]


class Metrics:
    """Latency histograms and finish counters, fed every RequestOutput on the event loop's thread."""

    def __init__(self):
        self.time_to_first_token = Histogram()
        self.inter_token_latency = Histogram()
        self.e2e_request_latency = Histogram()
        self.finished = Counter({reason: 0 for reason in FINISH_REASONS})
        self.last_token_time: dict[str, float] = {}

    def observe(self, output: RequestOutput) -> None:
        """Record the output's token times (TTFT for a request's first token, gaps after that) and its finish."""
        times, request_id = output.token_times, output.request_id
        if times:
            previous = self.last_token_time.get(request_id)
            if previous is None:
                self.time_to_first_token.observe(times[0] - output.arrival_time)
            else:
                self.inter_token_latency.observe(times[0] - previous)
            for earlier, later in zip(times, times[1:]):
                self.inter_token_latency.observe(later - earlier)
            self.last_token_time[request_id] = times[-1]
        if output.finished:
            self.finished[output.finish_reason] += 1
            end = self.last_token_time.pop(request_id, None)
            if output.finish_reason in ("stop", "length") and end is not None:
                self.e2e_request_latency.observe(end - output.arrival_time)

    def render(self, stats, model_name: str) -> str:
        """Prometheus text exposition format, every sample labelled with the model name."""
        labels = 'model_name="' + model_name.replace("\\", r"\\").replace('"', r'\"').replace("\n", r"\n") + '"'
        lines = []

        def family(name, kind, help_text, samples):
            lines.extend([f"# HELP nanostack:{name} {help_text}", f"# TYPE nanostack:{name} {kind}", *samples])

        for name, kind, help_text, value in (
                ("num_requests_running", "gauge", "Requests in the engine's running batch.", stats.num_running),
                ("num_requests_waiting", "gauge", "Requests queued for the running batch.", stats.num_waiting),
                ("kv_cache_usage_ratio", "gauge", "Fraction of KV blocks held by requests.", stats.kv_cache_usage),
                ("kv_cache_blocks", "gauge", "KV-cache blocks in the pool.", stats.num_kv_blocks),
                ("prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", stats.prompt_tokens_total),
                ("generation_tokens_total", "counter", "Tokens sampled.", stats.generation_tokens_total),
                ("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
                 stats.prefix_cache_queries),
                ("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
                 stats.prefix_cache_hits),
                ("num_preemptions_total", "counter", "Requests preempted for KV blocks.", stats.num_preemptions)):
            family(name, kind, help_text, [f"nanostack:{name}{{{labels}}} {value}"])
        spec = stats.speculative
        if spec is not None:
            for name, help_text, value in (
                    ("spec_decode_num_drafts_total", "Sequences verified with draft tokens.", spec.num_drafts),
                    ("spec_decode_num_draft_tokens_total", "Draft tokens proposed.", spec.num_draft_tokens),
                    ("spec_decode_num_accepted_tokens_total", "Draft tokens accepted.", spec.num_accepted_tokens)):
                family(name, "counter", help_text, [f"nanostack:{name}{{{labels}}} {value}"])
            family("spec_decode_num_accepted_tokens_per_pos_total", "counter", "Accepted draft tokens by position.",
                   [f'nanostack:spec_decode_num_accepted_tokens_per_pos_total{{{labels},position="{i}"}} {count}'
                    for i, count in enumerate(spec.accepted_per_position)])
            family("spec_decode_mean_acceptance_length", "gauge", "Draft tokens accepted per verification.",
                   [f"nanostack:spec_decode_mean_acceptance_length{{{labels}}} {spec.mean_acceptance_length}"])
        family("requests_finished_total", "counter", "Engine requests (one per choice) by finish reason.",
               [f'nanostack:requests_finished_total{{{labels},finish_reason="{reason}"}} {count}'
                for reason, count in self.finished.items()])
        for name, histogram, help_text in (
                ("time_to_first_token_seconds", self.time_to_first_token, "From arrival to the first token."),
                ("inter_token_latency_seconds", self.inter_token_latency, "Between consecutive tokens of a request."),
                ("e2e_request_latency_seconds", self.e2e_request_latency, "From arrival to the last token.")):
            family(name, "histogram", help_text, histogram.samples(f"nanostack:{name}", labels))
        return "\n".join(lines) + "\n"
