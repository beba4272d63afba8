"""Serving metrics in the Prometheus text format, as the HTTP server's /metrics route answers them, named as vLLM
names them.

One prefix, vLLM's: every family is `vllm:<name>` with vLLM's name, type, label names and histogram buckets
wherever the meaning is the same (which is everywhere here), so the dashboards, alert rules and autoscalers written
for vLLM work on nanostack unchanged. A `nanostack:` prefix, or both, would make every such query need rewriting or
double every series; nanostack exports nothing vLLM lacks a name for. Every sample carries `model_name`.

    gauges       num_requests_running, num_requests_waiting, kv_cache_usage_perc (a fraction, as in vLLM),
                 cache_config_info (1, with the block size and block count as labels)
    counters     prompt_tokens_total, generation_tokens_total, prefix_cache_queries_total, prefix_cache_hits_total,
                 num_preemptions_total, request_success_total{finished_reason}, spec_decode_* (when speculating)
    histograms   time_to_first_token_seconds, inter_token_latency_seconds, e2e_request_latency_seconds,
                 request_queue_time_seconds (arrival -> first scheduled), request_prefill_time_seconds
                 (first scheduled -> first token), request_decode_time_seconds (first -> last token),
                 request_inference_time_seconds (first scheduled -> last token), request_prompt_tokens,
                 request_generation_tokens, iteration_tokens_total (tokens per engine step)

Token times come on every RequestOutput; when a request was first scheduled, and how many tokens each step
computed, the engine thread reports (engine_loop.py). The per-request histograms count requests that finished
with "stop" or "length". Histograms are fed on two threads (the event loop, and the engine thread for the
iteration tokens), so each takes a lock: a scrape never sees a count that disagrees with its buckets.
"""
import bisect
import threading
from collections import Counter

from nanostack.serving.engine import RequestOutput

PREFIX = "vllm:"
# vLLM's buckets (vllm/v1/metrics/loggers.py), so bucket-based queries (le="0.1") mean the same on both servers.
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                               7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                       20.0, 40.0, 80.0)
REQUEST_TIME_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                        240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
FINISH_REASONS = ("stop", "length", "abort", "error")


def one_two_five_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value: vLLM's buckets for token counts of one request."""
    buckets, scale = [], 1
    while scale <= max_value:
        buckets += [b for b in (scale, 2 * scale, 5 * scale) if b <= max_value]
        scale *= 10
    return tuple(buckets)


class Histogram:
    """A Prometheus histogram: counts per upper bound, plus the sum and count of every observation."""

    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        """Count one value in the first bucket whose upper bound is >= value."""
        index = bisect.bisect_left(self.buckets, value)
        with self.lock:
            if index < len(self.counts):
                self.counts[index] += 1
            self.sum += value
            self.count += 1

    def samples(self, name: str, labels: str) -> list[str]:
        """Sample lines: cumulative counts per bound (le), then +Inf, the sum and the count."""
        with self.lock:
            counts, total, count = list(self.counts), self.sum, self.count
        lines, cumulative = [], 0
        for bound, bucket_count in zip(self.buckets, counts):
            cumulative += bucket_count
            lines.append(f'{name}_bucket{{{labels},le="{float(bound)}"}} {cumulative}')
        lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {count}')
        return lines + [f"{name}_sum{{{labels}}} {float(total)!r}", f"{name}_count{{{labels}}} {count}"]


class Metrics:
    """The histograms and finish counters; `observe` is fed every RequestOutput on the event loop's thread."""

    def __init__(self, max_model_len: int, block_size: int):
        self.block_size = block_size
        token_buckets = one_two_five_buckets(max_model_len)
        self.histograms = {  # family name (after the prefix) -> (histogram, help text)
            "time_to_first_token_seconds": (Histogram(TIME_TO_FIRST_TOKEN_BUCKETS), "From arrival to the first token."),
            "inter_token_latency_seconds": (Histogram(INTER_TOKEN_BUCKETS), "Between consecutive tokens of a request."),
            "e2e_request_latency_seconds": (Histogram(REQUEST_TIME_BUCKETS), "From arrival to the last token."),
            "request_queue_time_seconds": (Histogram(REQUEST_TIME_BUCKETS), "From arrival to first being scheduled."),
            "request_prefill_time_seconds": (Histogram(REQUEST_TIME_BUCKETS),
                                             "From first being scheduled to the first token."),
            "request_decode_time_seconds": (Histogram(REQUEST_TIME_BUCKETS), "From the first to the last token."),
            "request_inference_time_seconds": (Histogram(REQUEST_TIME_BUCKETS),
                                               "From first being scheduled to the last token."),
            "request_prompt_tokens": (Histogram(token_buckets), "Prompt tokens of a finished request."),
            "request_generation_tokens": (Histogram(token_buckets), "Tokens generated for a finished request."),
            "iteration_tokens_total": (Histogram(ITERATION_TOKEN_BUCKETS), "Tokens computed by one engine step."),
        }
        self.finished = Counter({reason: 0 for reason in FINISH_REASONS})
        self.last_token_time: dict[str, float] = {}

    def observe_time(self, name: str, value: float) -> None:
        """Count a value in the histogram `name` (a key of self.histograms)."""
        self.histograms[name][0].observe(value)

    def observe_step(self, num_tokens: int) -> None:
        """One engine step that computed `num_tokens` tokens (called on the engine thread)."""
        self.observe_time("iteration_tokens_total", num_tokens)

    def observe(self, output: RequestOutput, scheduled_time: float | None) -> None:
        """Record the output's token times (TTFT for a request's first token, gaps after that) and, once it finished,
        its phases; `scheduled_time` is when the request was first scheduled (given with its finishing output)."""
        times, request_id = output.token_times, output.request_id
        if times:
            previous = self.last_token_time.get(request_id)
            if previous is None:
                self.observe_time("time_to_first_token_seconds", times[0] - output.arrival_time)
            else:
                self.observe_time("inter_token_latency_seconds", times[0] - previous)
            for earlier, later in zip(times, times[1:]):
                self.observe_time("inter_token_latency_seconds", later - earlier)
            self.last_token_time[request_id] = times[-1]
        if not output.finished:
            return
        self.finished[output.finish_reason] += 1
        end = self.last_token_time.pop(request_id, None)
        if output.finish_reason in ("stop", "length") and end is not None:
            # A request with a token was scheduled, so the engine loop knows when that first happened.
            for name, value in (("e2e_request_latency_seconds", end - output.arrival_time),
                                ("request_queue_time_seconds", scheduled_time - output.arrival_time),
                                ("request_prefill_time_seconds", output.first_token_time - scheduled_time),
                                ("request_decode_time_seconds", end - output.first_token_time),
                                ("request_inference_time_seconds", end - scheduled_time),
                                ("request_prompt_tokens", output.prompt_tokens),
                                ("request_generation_tokens", output.completion_tokens)):
                self.observe_time(name, value)

    def render(self, stats, model_name: str) -> str:
        """Prometheus text exposition format, every sample labelled with the model name."""
        labels = 'model_name="' + model_name.replace("\\", r"\\").replace('"', r'\"').replace("\n", r"\n") + '"'
        lines = []

        def family(name, kind, help_text, samples):
            lines.extend([f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}", *samples])

        for name, kind, help_text, value in (
                ("num_requests_running", "gauge", "Requests in the engine's running batch.", stats.num_running),
                ("num_requests_waiting", "gauge", "Requests queued for the running batch.", stats.num_waiting),
                ("kv_cache_usage_perc", "gauge", "Fraction of KV blocks held by requests (1 = full).",
                 stats.kv_cache_usage),
                ("prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", stats.prompt_tokens_total),
                ("generation_tokens_total", "counter", "Tokens sampled.", stats.generation_tokens_total),
                ("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
                 stats.prefix_cache_queries),
                ("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
                 stats.prefix_cache_hits),
                ("num_preemptions_total", "counter", "Requests preempted for KV blocks.", stats.num_preemptions)):
            family(name, kind, help_text, [f"{PREFIX}{name}{{{labels}}} {value}"])
        family("cache_config_info", "gauge", "The KV cache's settings, as labels.",
               [f'{PREFIX}cache_config_info{{{labels},block_size="{self.block_size}",'
                f'num_gpu_blocks="{stats.num_kv_blocks}"}} 1'])
        spec = stats.speculative
        if spec is not None:
            for name, help_text, value in (
                    ("spec_decode_num_drafts_total", "Sequences verified with draft tokens.", spec.num_drafts),
                    ("spec_decode_num_draft_tokens_total", "Draft tokens proposed.", spec.num_draft_tokens),
                    ("spec_decode_num_accepted_tokens_total", "Draft tokens accepted.", spec.num_accepted_tokens)):
                family(name, "counter", help_text, [f"{PREFIX}{name}{{{labels}}} {value}"])
            family("spec_decode_num_accepted_tokens_per_pos_total", "counter", "Accepted draft tokens by position.",
                   [f'{PREFIX}spec_decode_num_accepted_tokens_per_pos_total{{{labels},position="{i}"}} {count}'
                    for i, count in enumerate(spec.accepted_per_position)])
        family("request_success_total", "counter", "Finished engine requests (one per choice) by finish reason.",
               [f'{PREFIX}request_success_total{{{labels},finished_reason="{reason}"}} {count}'
                for reason, count in self.finished.items()])
        for name, (histogram, help_text) in self.histograms.items():
            family(name, "histogram", help_text, histogram.samples(f"{PREFIX}{name}", labels))
        return "\n".join(lines) + "\n"
