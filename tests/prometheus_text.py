"""A strict reader of the Prometheus text exposition format, shared by the serving tests (test_api.py,
test_metrics.py): every line must be a HELP, a TYPE or a sample of a declared family."""
import re

LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
SAMPLE = re.compile(rf'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{{(?P<labels>{LABEL}(?:,{LABEL})*)\}} '
                    r'(?P<value>[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|Inf))$')
COMMENT = re.compile(r"^# (?:HELP (?P<help>[a-zA-Z_:][a-zA-Z0-9_:]*) .+|TYPE (?P<type>[a-zA-Z_:][a-zA-Z0-9_:]*) "
                     r"(?P<kind>counter|gauge|histogram))$")


def parse_prometheus(text: str) -> dict:
    """{(name, frozenset of label pairs): value}; every line must be a HELP, TYPE or sample of a declared family."""
    assert text.endswith("\n")
    families, samples = {}, {}
    for line in text.splitlines():
        comment, sample = COMMENT.match(line), SAMPLE.match(line)
        assert comment or sample, f"not Prometheus text: {line!r}"
        if comment and comment["type"]:
            families[comment["type"]] = comment["kind"]
        elif sample:
            name = sample["name"]
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in families else name
            assert family in families, f"{name} has no # TYPE line before it"
            labels = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', sample["labels"]))
            assert (name, labels) not in samples, f"duplicate sample {line!r}"
            samples[name, labels] = float(sample["value"])
    return samples


def metric_families(text: str) -> dict[str, str]:
    """{family name: counter | gauge | histogram} from the TYPE lines."""
    return {match["type"]: match["kind"] for match in map(COMMENT.match, text.splitlines()) if match and match["type"]}
