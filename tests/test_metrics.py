"""Serving metrics (serving/metrics.py): histograms against a naive count, vLLM's bucket rule, and the Grafana
dashboard and Prometheus alert rules shipped in monitoring/, which may name only metrics the server exports."""
import json
import random
import re
from pathlib import Path

import pytest
import yaml

from nanostack.serving.engine import EngineStats, RequestOutput
from nanostack.serving.metrics import Histogram, Metrics, one_two_five_buckets
from nanostack.serving.speculative import SpecStats
from prometheus_text import metric_families, parse_prometheus

ROOT = Path(__file__).resolve().parent.parent
METRIC_NAME = re.compile(r"vllm:[a-zA-Z0-9_:]+")
# The histograms a vLLM dashboard is built on; the shipped one must chart each.
HISTOGRAMS = ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
              "request_prompt_tokens", "request_generation_tokens", "iteration_tokens_total")


def test_histogram_counts_match_a_naive_count():
    rng = random.Random(0)
    buckets = (0.1, 0.5, 1.0, 2.5)
    values = [rng.choice([0.1, 1.0, 3.0]) if rng.random() < 0.3 else rng.uniform(0, 4) for _ in range(500)]
    histogram = Histogram(buckets)
    for value in values:
        histogram.observe(value)
    samples = parse_prometheus("# TYPE h histogram\n" + "\n".join(histogram.samples("h", 'm="x"')) + "\n")
    for bound in buckets:  # cumulative: every value <= the bound, boundary values included
        labels = frozenset({("m", "x"), ("le", str(float(bound)))})
        assert samples["h_bucket", labels] == sum(value <= bound for value in values)
    assert samples["h_bucket", frozenset({("m", "x"), ("le", "+Inf")})] == len(values)
    assert samples["h_sum", frozenset({("m", "x")})] == pytest.approx(sum(values))


def test_token_buckets_follow_vllms_one_two_five_rule():
    assert one_two_five_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert one_two_five_buckets(256) == (1, 2, 5, 10, 20, 50, 100, 200)


def exported_metrics() -> tuple[dict[str, str], set[str], set[str]]:
    """(families by kind, every name a query may use, every label name) of a server that speculates."""
    metrics = Metrics(max_model_len=256, block_size=16)
    output = RequestOutput("r", [5], "x", True, "length", prompt_tokens=3, completion_tokens=1, arrival_time=1.0,
                           first_token_time=1.5, token_times=[1.5])
    metrics.observe(output, scheduled_time=1.2)
    metrics.observe_step(4)
    stats = EngineStats(1, 0, 0.5, 64, 10, 4, 3, 1, 0, SpecStats(2, 6, 3, [2, 1, 0]))
    text = metrics.render(stats, "nanostack")
    families, samples = metric_families(text), parse_prometheus(text)
    names = set(families) | {name for name, _ in samples}
    labels = {label for _, pairs in samples for label, _ in pairs}
    return families, names, labels


def expressions(node) -> list[str]:
    """The PromQL under every "expr" key of a parsed dashboard or rules file."""
    if isinstance(node, dict):
        return ([node["expr"]] if "expr" in node else []) + [e for value in node.values() for e in expressions(value)]
    return [e for value in node for e in expressions(value)] if isinstance(node, list) else []


def check_queries(expressions: list[str], names: set[str], labels: set[str]) -> set[str]:
    """Assert each expression names only exported metrics and labels; returns the metric names used."""
    used = set()
    for expression in expressions:
        found = set(METRIC_NAME.findall(expression))
        assert found, f"no vllm: metric in {expression!r}"
        assert found <= names, f"{expression!r} names metrics the server does not export: {found - names}"
        named_labels = set(re.findall(r"([a-z_]+)\s*(?:=~|!=|=)\s*\"", expression))
        for grouping in re.findall(r"\b(?:by|ignoring|on)\s*\(([^)]*)\)", expression):
            named_labels |= {label.strip() for label in grouping.split(",") if label.strip()}
        assert named_labels <= labels, f"{expression!r} uses labels the server does not set: {named_labels - labels}"
        used |= found
    return used


def test_grafana_dashboard_charts_only_exported_metrics_and_every_histogram():
    families, names, labels = exported_metrics()
    dashboard = json.loads((ROOT / "monitoring" / "grafana-dashboard.json").read_text())
    assert [p["id"] for p in dashboard["panels"]] == list(range(1, len(dashboard["panels"]) + 1))
    for panel in dashboard["panels"]:
        assert panel["title"] and panel["targets"] and set(panel["gridPos"]) == {"x", "y", "w", "h"}, panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    variables = [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    used = check_queries(expressions(dashboard["panels"]) + variables, names, labels)
    charted = {re.sub(r"_(bucket|sum|count)$", "", name.removeprefix("vllm:")) for name in used}
    assert set(HISTOGRAMS) <= charted, f"not charted: {set(HISTOGRAMS) - charted}"
    assert {f"vllm:{name}" for name in HISTOGRAMS} <= {name for name, kind in families.items() if kind == "histogram"}


def test_alert_rules_are_well_formed_and_name_only_exported_metrics():
    _, names, labels = exported_metrics()
    rules = yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len({rule["alert"] for rule in alerts}) == len(alerts) >= 5
    for rule in alerts:
        assert re.fullmatch(r"\d+[smh]", rule["for"]) and rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    check_queries(expressions(rules), names, labels)
