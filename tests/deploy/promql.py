"""Just enough PromQL reading for the deploy tests: the metric names an expression selects, and
the sample names a /metrics text exports."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

# series Prometheus makes itself, not the target
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
            "unless", "offset", "inf", "nan"}  # fmt: skip
SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
            "summary": ["_sum", "_count"]}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects (functions, label matchers, grouping labels, ranges and
    numbers left out)."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for m in re.finditer(r"(?<![\w:$.])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        name, call = m.group(1), m.group(2)
        if not call and name.lower() not in KEYWORDS:
            names.add(name)
    return names


def exported_names(metrics_text: str) -> set[str]:
    """Every series name a /metrics text can carry: its samples' names, and the suffixed names
    of each family (a labelled counter has no sample before its first increment)."""
    names = set()
    for family in text_string_to_metric_families(metrics_text):
        names.add(family.name)
        names.update(family.name + s for s in SUFFIXES.get(family.type, []))
        names.update(sample.name for sample in family.samples)
    return names
