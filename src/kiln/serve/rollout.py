"""Safe rollout of model versions: a routing table with canary weights, sticky sessions,
shadow targets, and rules that roll a bad candidate back on their own.

A route maps a public model name to versions (the base model's served name or an adapter's)
with weights; a request whose sticky header (default x-session-id) is set always lands on the
same version while the weights hold. Each finished request is recorded against its version:
success, latency, the mean logprob of its tokens and its length, in a sliding window. When a
version other than the route's stable one breaks a rule over its window (error rate, p95
latency, mean logprob below a floor or below the stable version's by a margin), its weight
goes to 0, and the reason is logged and kept. Shadow targets get a copy of each request; their
answers are measured and discarded. drift() compares a version's recent output lengths and
logprobs with its first window (population stability index).

The table is JSON (`--rollout-config FILE`):

    {"routes": {"chat": {"versions": {"tiny": 95, "chat-v2": 5}, "stable": "tiny",
                         "shadow": ["chat-v3"], "sticky_header": "x-session-id",
                         "rules": {"window": 200, "min_requests": 20, "max_error_rate": 0.05,
                                   "max_p95_latency_s": 5.0, "min_mean_logprob": -4.0,
                                   "max_logprob_drop": 1.0}}}}
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kiln.errors import InputError

log = logging.getLogger("kiln.serve")


@dataclass
class Rules:
    """When a candidate is rolled back (None: that rule is off)."""

    window: int = 200  # the newest requests each rule looks at
    min_requests: int = 20  # no verdict on fewer
    max_error_rate: float | None = 0.05
    max_p95_latency_s: float | None = None
    min_mean_logprob: float | None = None  # quality floor: mean logprob of served tokens
    max_logprob_drop: float | None = None  # quality: at most this far below the stable's


@dataclass
class Outcome:
    ok: bool
    latency_s: float
    mean_logprob: float | None = None  # None: unknown (failed, or no tokens)
    num_tokens: int = 0


@dataclass
class Route:
    versions: dict[str, float]
    stable: str
    shadow: list[str] = field(default_factory=list)
    sticky_header: str = "x-session-id"
    rules: Rules = field(default_factory=Rules)
    rolled_back: dict[str, str] = field(default_factory=dict)  # version -> why

    def live_weights(self) -> list[tuple[str, float]]:
        live = [(v, w) for v, w in self.versions.items() if v not in self.rolled_back and w > 0]
        return live or [(self.stable, 1.0)]


class VersionStats:
    """A version's outcomes: the sliding window and the first window (the drift baseline)."""

    def __init__(self, window: int):
        self.recent: deque[Outcome] = deque(maxlen=window)
        self.baseline: list[Outcome] = []
        self.window = window
        self.requests = self.errors = 0

    def add(self, o: Outcome) -> None:
        self.recent.append(o)
        if len(self.baseline) < self.window:
            self.baseline.append(o)
        self.requests += 1
        self.errors += not o.ok

    def mean_logprob(self) -> float | None:
        vals = [o.mean_logprob for o in self.recent if o.mean_logprob is not None]
        return sum(vals) / len(vals) if vals else None

    def p95_latency(self) -> float:
        lat = sorted(o.latency_s for o in self.recent if o.ok)
        return lat[min(len(lat) - 1, math.ceil(0.95 * len(lat)) - 1)] if lat else 0.0


class RolloutTable:
    """Public name -> Route, the outcomes per (route, version), and the rollback decisions."""

    def __init__(self, routes: dict[str, Route], seed: int | None = None):
        self.routes = routes
        self.stats: dict[tuple[str, str], VersionStats] = {}
        self.rng = random.Random(seed)
        self.shadows: set = set()  # the shadow requests running (asyncio tasks)

    @classmethod
    def from_dict(cls, spec: dict[str, Any], known: set[str] | None = None) -> RolloutTable:
        """From the JSON shape above; `known`: the model names the server serves."""
        routes = {}
        for name, r in (spec.get("routes") or {}).items():
            try:
                rules = Rules(**r.get("rules", {}))
                route = Route(
                    versions={v: float(w) for v, w in r["versions"].items()},
                    stable=r.get("stable") or next(iter(r["versions"])),
                    shadow=list(r.get("shadow", [])),
                    sticky_header=r.get("sticky_header", "x-session-id").lower(),
                    rules=rules,
                )
            except (KeyError, TypeError, ValueError, StopIteration) as e:
                raise InputError(f"rollout route {name!r}: {e!r}") from None
            if any(w < 0 for w in route.versions.values()) or not sum(route.versions.values()):
                raise InputError(f"rollout route {name!r}: weights must be >= 0, not all 0")
            targets = {*route.versions, route.stable, *route.shadow}
            unknown = sorted(targets - known) if known is not None else []
            if unknown:
                raise InputError(f"rollout route {name!r} names models not served: {unknown}")
            routes[name] = route
        return cls(routes)

    @classmethod
    def from_file(cls, path: str, known: set[str] | None = None) -> RolloutTable:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()), known)
        except (OSError, ValueError) as e:
            raise InputError(f"--rollout-config {path}: {e}") from None

    def pick(self, public: str, sticky: str | None = None) -> str:
        """The version that serves this request: by weight; the same for a sticky value."""
        live = self.routes[public].live_weights()
        total = sum(w for _, w in live)
        if sticky:
            digest = hashlib.sha256(f"{public}\0{sticky}".encode()).digest()
            u = int.from_bytes(digest[:8], "big") / 2**64
        else:
            u = self.rng.random()
        at = u * total
        for version, w in live:
            at -= w
            if at < 0:
                return version
        return live[-1][0]

    def record(self, public: str, version: str, outcome: Outcome) -> str | None:
        """Add an outcome; the rollback reason if this one rolled `version` back."""
        route = self.routes[public]
        stats = self._stats(public, version)
        stats.add(outcome)
        if version == route.stable or version in route.rolled_back or version not in route.versions:
            return None
        why = self._broken(route, stats, self.stats.get((public, route.stable)))
        if why is not None:
            route.rolled_back[version] = why
            log.warning("rollout %s: rolled %s back to %s: %s", public, version, route.stable, why)
        return why

    def _stats(self, public: str, version: str) -> VersionStats:
        key = (public, version)
        if key not in self.stats:
            self.stats[key] = VersionStats(self.routes[public].rules.window)
        return self.stats[key]

    @staticmethod
    def _broken(route: Route, s: VersionStats, stable: VersionStats | None) -> str | None:
        rules, n = route.rules, len(s.recent)
        if n < rules.min_requests:
            return None
        errors = sum(not o.ok for o in s.recent) / n
        if rules.max_error_rate is not None and errors > rules.max_error_rate:
            return f"error rate {errors:.1%} > {rules.max_error_rate:.1%} over {n} requests"
        p95 = s.p95_latency()
        if rules.max_p95_latency_s is not None and p95 > rules.max_p95_latency_s:
            return f"p95 latency {p95:.3f} s > {rules.max_p95_latency_s} s over {n} requests"
        mean = s.mean_logprob()
        if mean is not None and rules.min_mean_logprob is not None:
            if mean < rules.min_mean_logprob:
                return f"mean logprob {mean:.3f} < {rules.min_mean_logprob} over {n} requests"
        if mean is not None and rules.max_logprob_drop is not None and stable is not None:
            ref = stable.mean_logprob()
            if ref is not None and ref - mean > rules.max_logprob_drop:
                return (f"mean logprob {mean:.3f} is {ref - mean:.3f} below the stable "
                        f"version's {ref:.3f} (> {rules.max_logprob_drop})")  # fmt: skip
        return None

    def drift(self, public: str, version: str) -> dict[str, float]:
        """Population stability index of recent output lengths and mean logprobs against the
        version's first window (about 0.1: a shift worth a look; 0.25: a large one)."""
        s = self.stats.get((public, version))
        if s is None or len(s.baseline) < s.window:
            return {}
        lengths = psi([o.num_tokens for o in s.baseline], [o.num_tokens for o in s.recent])
        lp = [o.mean_logprob for o in s.baseline if o.mean_logprob is not None]
        lp_recent = [o.mean_logprob for o in s.recent if o.mean_logprob is not None]
        return {"output_tokens": lengths, "mean_logprob": psi(lp, lp_recent)}


def psi(baseline: list[float], recent: list[float], bins: int = 10) -> float:
    """Population stability index of `recent` against `baseline`, over baseline deciles."""
    if not baseline or not recent:
        return 0.0
    ranked = sorted(baseline)
    edges = [ranked[min(len(ranked) - 1, len(ranked) * i // bins)] for i in range(1, bins)]

    def shares(values):  # bin 0: below anything the baseline saw
        counts = [0] * (bins + 1)
        for v in values:
            counts[0 if v < ranked[0] else 1 + sum(v > e for e in edges)] += 1
        return [(c + 0.5) / (len(values) + 0.5 * len(counts)) for c in counts]  # smoothed

    return sum((r - b) * math.log(r / b) for b, r in zip(shares(baseline), shares(recent)))


class RolloutCollector(Collector):
    """Per-version Prometheus metrics of a RolloutTable, read when scraped."""

    def __init__(self, table: RolloutTable):
        self.table = table

    def collect(self) -> Iterator[Metric]:
        labels = ["route", "version"]
        c, g = CounterMetricFamily, GaugeMetricFamily
        fams = {
            "requests": c("kiln:rollout_requests", "Requests served.", labels=labels),
            "errors": c("kiln:rollout_errors", "Requests failed.", labels=labels),
            "p95": g("kiln:rollout_p95_latency_seconds", "p95 latency over the rule window.",
                     labels=labels),
            "logprob": g("kiln:rollout_mean_logprob", "Mean logprob of served tokens over the "
                         "window.", labels=labels),
            "weight": g("kiln:rollout_weight", "Routing weight now (0 once rolled back).",
                        labels=labels),
            "drift": g("kiln:rollout_drift_psi", "Output drift against the version's first "
                       "window (PSI).", labels=[*labels, "signal"]),
        }  # fmt: skip
        for public, route in self.table.routes.items():
            live = dict(route.live_weights())
            for version in {*route.versions, *route.shadow}:
                key = [public, version]
                fams["weight"].add_metric(key, live.get(version, 0.0))
                s = self.table.stats.get((public, version))
                if s is None:
                    continue
                fams["requests"].add_metric(key, s.requests)
                fams["errors"].add_metric(key, s.errors)
                fams["p95"].add_metric(key, s.p95_latency())
                mean = s.mean_logprob()
                if mean is not None:
                    fams["logprob"].add_metric(key, mean)
                for signal, value in self.table.drift(public, version).items():
                    fams["drift"].add_metric([*key, signal], value)
        yield from fams.values()
