"""The PromQL that deploy/grafana/kiln.json uses, evaluated on scraped /metrics samples: enough to
render the dashboard without Prometheus (benchmarks/render_dashboard.py), and nothing more.

Supported: selectors with label matchers (=, !=, =~, !~) and a range ([8s]); rate(); sum with or
without `by (...)`; histogram_quantile(); + - * / between two vectors (one-to-one, on equal label
sets) or a vector and a number; Grafana's $variables substituted first. Anything else is a
`PromQLError`, never a silently empty panel. Semantics follow Prometheus: rate() extrapolates to
the window's edges as Prometheus' extrapolatedRate does, an instant selector takes the newest
sample within 5 minutes, histogram_quantile() interpolates linearly within a bucket.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

FUNCTIONS = {"rate", "histogram_quantile"}
AGGREGATIONS = {"sum"}
LOOKBACK_S = 300.0  # Prometheus' default lookback delta for instant selectors
UNITS_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}

Labels = frozenset  # of (name, value) pairs; "__name__" holds the metric name


class PromQLError(ValueError):
    """An expression outside the supported subset, or malformed."""


# --- parsing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Number:
    value: float


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value)
    range_s: float | None = None


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple


@dataclass(frozen=True)
class Aggregate:
    op: str
    by: tuple[str, ...] | None
    expr: object


@dataclass(frozen=True)
class BinOp:
    op: str
    lhs: object
    rhs: object


TOKEN = re.compile(
    r"""\s*(?:
    (?P<string>"(?:\\.|[^"\\])*")
  | (?P<duration>(?:\d+(?:ms|s|m|h|d|w|y))+)(?![\w:])
  | (?P<number>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)
  | (?P<ident>[A-Za-z_:][\w:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^(){}\[\],=<>])
  | (?P<var>\$\{?\w+\}?)
    )""",
    re.VERBOSE,
)


def tokenize(expr: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        m = TOKEN.match(expr, pos)
        if m is None:
            raise PromQLError(f"cannot read {expr[pos:]!r} in {expr!r}")
        kind = m.lastgroup
        if kind == "var":
            raise PromQLError(f"unsubstituted variable {m.group(kind)} in {expr!r}")
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    return tokens


def duration_s(text: str) -> float:
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise PromQLError(f"bad duration {text!r}")
    return sum(int(n) * UNITS_S[u] for n, u in parts)


class Parser:
    """Recursive descent over the supported subset; precedence: * / over + -."""

    def __init__(self, expr: str):
        self.expr = expr
        self.tokens = tokenize(expr)
        self.i = 0

    def peek(self, k: int = 0) -> tuple[str, str] | None:
        j = self.i + k
        return self.tokens[j] if j < len(self.tokens) else None

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        tok = self.peek()
        if (
            tok is None
            or (value is not None and tok[1] != value)
            or (kind is not None and tok[0] != kind)
        ):
            want = value or kind
            raise PromQLError(f"expected {want!r}, got {tok and tok[1]!r} in {self.expr!r}")
        self.i += 1
        return tok[1]

    def at(self, value: str) -> bool:
        tok = self.peek()
        return tok is not None and tok[0] == "op" and tok[1] == value

    def parse(self):
        node = self.additive()
        if self.peek() is not None:
            raise PromQLError(f"unsupported or trailing {self.peek()[1]!r} in {self.expr!r}")
        return node

    def additive(self):
        return self._left_assoc("+-", self.multiplicative)

    def multiplicative(self):
        return self._left_assoc("*/", self.unary)

    def _left_assoc(self, ops: str, operand):
        """operand (op operand)*, folded to the left, for the one-character ops in `ops`."""
        node = operand()
        while any(self.at(op) for op in ops):
            op = self.take()
            node = BinOp(op, node, operand())
        return node

    def unary(self):
        if self.at("-"):
            self.take()
            return BinOp("*", Number(-1.0), self.unary())
        return self.primary()

    def primary(self):
        tok = self.peek()
        if tok is None:
            raise PromQLError(f"unexpected end of {self.expr!r}")
        kind, value = tok
        if kind == "number":
            self.take()
            return Number(float(value))
        if self.at("("):
            self.take("(")
            node = self.additive()
            self.take(")")
            return node
        if kind != "ident":
            raise PromQLError(f"unexpected {value!r} in {self.expr!r}")
        nxt = self.peek(1)
        if value in AGGREGATIONS:
            return self.aggregate()
        if nxt is not None and nxt[1] == "(" or value in ("by", "without"):
            if value not in FUNCTIONS:
                raise PromQLError(f"unsupported function or keyword {value!r} in {self.expr!r}")
            return self.call()
        return self.selector()

    def grouping(self) -> tuple[str, ...]:
        if self.peek() and self.peek()[1] == "without":
            raise PromQLError(f"unsupported 'without' in {self.expr!r}")
        self.take("by")
        self.take("(")
        labels = []
        while not self.at(")"):
            labels.append(self.take(kind="ident"))
            if not self.at(")"):
                self.take(",")
        self.take(")")
        return tuple(labels)

    def aggregate(self):
        op = self.take(kind="ident")
        by = None
        if self.peek() and self.peek()[1] in ("by", "without"):
            by = self.grouping()
        self.take("(")
        expr = self.additive()
        self.take(")")
        if self.peek() and self.peek()[1] in ("by", "without"):
            if by is not None:
                raise PromQLError(f"two groupings in {self.expr!r}")
            by = self.grouping()
        return Aggregate(op, by, expr)

    def call(self):
        func = self.take(kind="ident")
        self.take("(")
        args = []
        while not self.at(")"):
            args.append(self.additive())
            if not self.at(")"):
                self.take(",")
        self.take(")")
        if func == "rate":
            if len(args) != 1 or not isinstance(args[0], Selector) or args[0].range_s is None:
                raise PromQLError(f"rate() takes one range selector, in {self.expr!r}")
        elif func == "histogram_quantile":
            if len(args) != 2 or not isinstance(args[0], Number):
                raise PromQLError(f"histogram_quantile(number, vector), in {self.expr!r}")
        return Call(func, tuple(args))

    def selector(self):
        name = self.take(kind="ident")
        matchers = []
        if self.at("{"):
            self.take("{")
            while not self.at("}"):
                label = self.take(kind="ident")
                op = self.take(kind="op")
                if op not in ("=", "!=", "=~", "!~"):
                    raise PromQLError(f"bad matcher operator {op!r} in {self.expr!r}")
                raw = self.take(kind="string")
                matchers.append((label, op, raw[1:-1].encode().decode("unicode_escape")))
                if not self.at("}"):
                    self.take(",")
            self.take("}")
        range_s = None
        if self.at("["):
            self.take("[")
            tok = self.peek()
            if tok is None or tok[0] not in ("duration",):
                raise PromQLError(f"bad range in {self.expr!r}")
            range_s = duration_s(self.take())
            if self.at(":"):
                raise PromQLError(f"subqueries are not supported: {self.expr!r}")
            self.take("]")
        if self.peek() and self.peek()[1] == "offset":
            raise PromQLError(f"offset is not supported: {self.expr!r}")
        return Selector(name, tuple(matchers), range_s)


def parse(expr: str):
    return Parser(expr).parse()


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's template variables: `$name` / `${name}` replaced; an unknown one is an error."""

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise PromQLError(f"no value for the dashboard variable ${name} in {expr!r}")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


# --- samples ---------------------------------------------------------------------------------


class SeriesStore:
    """Scraped samples: series (a frozenset of label pairs, "__name__" among them) -> a list of
    (time, value), appended in time order."""

    def __init__(self):
        self.series: dict[Labels, list[tuple[float, float]]] = defaultdict(list)

    def add(self, t: float, name: str, labels: dict[str, str], value: float) -> None:
        key = frozenset({**labels, "__name__": name}.items())
        points = self.series[key]
        if points and t <= points[-1][0]:
            raise ValueError(f"samples out of order for {dict(key)}")
        points.append((t, value))

    def add_scrape(self, t: float, text: str, instance: str, job: str = "kiln") -> None:
        """One /metrics text at time t, with the target labels Prometheus adds."""
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.add(t, s.name, {**s.labels, "instance": instance, "job": job}, s.value)

    def matching(self, name: str, matchers) -> list[Labels]:
        out = []
        for key in self.series:
            labels = dict(key)
            if labels["__name__"] == name and all(
                match(labels.get(k, ""), op, v) for k, op, v in matchers
            ):
                out.append(key)
        return out


def match(value: str, op: str, want: str) -> bool:
    if op == "=":
        return value == want
    if op == "!=":
        return value != want
    hit = re.fullmatch(want, value) is not None  # PromQL regexes are anchored
    return hit if op == "=~" else not hit


def drop_name(key: Labels) -> Labels:
    return frozenset((k, v) for k, v in key if k != "__name__")


# --- evaluation ------------------------------------------------------------------------------


def extrapolated_rate(points: list[tuple[float, float]], start: float, end: float) -> float | None:
    """Prometheus' rate() of a counter's samples in (start, end]: the increase (resets
    corrected), extrapolated to the window's edges when the samples come close to them (within
    1.1 x their mean spacing; else by half a spacing), and not below zero at the start."""
    if len(points) < 2:
        return None
    first_t, first_v = points[0]
    last_t, last_v = points[-1]
    increase = last_v - first_v
    prev = first_v
    for _, v in points[1:]:
        if v < prev:  # a counter reset: the counter restarted from zero
            increase += prev
        prev = v
    sampled = last_t - first_t
    to_start, to_end = first_t - start, end - last_t
    if increase > 0 and first_v >= 0:
        to_zero = sampled * (first_v / increase)
        to_start = min(to_start, to_zero)
    average = sampled / (len(points) - 1)
    threshold = average * 1.1
    interval = sampled
    interval += to_start if to_start < threshold else average / 2
    interval += to_end if to_end < threshold else average / 2
    return increase * (interval / sampled) / (end - start)


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile() over (upper bound, cumulative count) pairs."""
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    buckets = sorted(buckets)
    if not buckets or not math.isinf(buckets[-1][0]) or len(buckets) < 2:
        return math.nan
    counts, running = [], 0.0
    for _, c in buckets:  # rates of counters can be non-monotonic by float error
        running = max(running, c)
        counts.append(running)
    total = counts[-1]
    if total == 0 or math.isnan(total):
        return math.nan
    rank = q * total
    b = next(i for i, c in enumerate(counts) if c >= rank)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    if b == 0 and buckets[0][0] <= 0:
        return buckets[0][0]
    start, end, count = 0.0, buckets[b][0], counts[b]
    if b > 0:
        start = buckets[b - 1][0]
        count -= counts[b - 1]
        rank -= counts[b - 1]
    return start + (end - start) * (rank / count)


def divide(a: float, b: float) -> float:
    if b == 0:
        return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)
    return a / b


OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": divide}


def evaluate(node, store: SeriesStore, t: float) -> dict[Labels, float] | float:
    """An instant vector ({labels: value}) or a number, at time t."""
    if isinstance(node, Number):
        return node.value
    if isinstance(node, Selector):
        if node.range_s is not None:
            raise PromQLError("a range selector outside rate()")
        out = {}
        for key in store.matching(node.name, node.matchers):
            recent = [p for p in store.series[key] if t - LOOKBACK_S < p[0] <= t]
            if recent:
                out[key] = recent[-1][1]
        return out
    if isinstance(node, Call) and node.func == "rate":
        sel = node.args[0]
        out = {}
        for key in store.matching(sel.name, sel.matchers):
            points = [p for p in store.series[key] if t - sel.range_s < p[0] <= t]
            r = extrapolated_rate(points, t - sel.range_s, t)
            if r is not None:
                out[drop_name(key)] = r
        return out
    if isinstance(node, Call) and node.func == "histogram_quantile":
        q = node.args[0].value
        vec = evaluate(node.args[1], store, t)
        if not isinstance(vec, dict):
            raise PromQLError("histogram_quantile() of a number")
        groups = defaultdict(list)
        for key, v in vec.items():
            labels = dict(drop_name(key))
            if "le" not in labels:
                continue
            le = float(labels.pop("le"))
            groups[frozenset(labels.items())].append((le, v))
        return {k: bucket_quantile(q, b) for k, b in groups.items()}
    if isinstance(node, Aggregate):
        vec = evaluate(node.expr, store, t)
        if not isinstance(vec, dict):
            raise PromQLError(f"{node.op}() of a number")
        sums: dict[Labels, float] = defaultdict(float)
        for key, v in vec.items():
            labels = dict(key)
            group = {k: labels[k] for k in (node.by or ()) if k in labels}
            sums[frozenset(group.items())] += v
        return dict(sums)
    if isinstance(node, BinOp):
        lhs, rhs = evaluate(node.lhs, store, t), evaluate(node.rhs, store, t)
        f = OPS[node.op]
        if not isinstance(lhs, dict) and not isinstance(rhs, dict):
            return f(lhs, rhs)
        if not isinstance(lhs, dict):
            return {drop_name(k): f(lhs, v) for k, v in rhs.items()}
        if not isinstance(rhs, dict):
            return {drop_name(k): f(v, rhs) for k, v in lhs.items()}
        right = {drop_name(k): v for k, v in rhs.items()}
        if len(right) != len(rhs):
            raise PromQLError("many-to-one matching on the right-hand side")
        out = {}
        for k, v in lhs.items():
            k = drop_name(k)
            if k in out:
                raise PromQLError("many-to-one matching on the left-hand side")
            if k in right:
                out[k] = f(v, right[k])
        return out
    raise PromQLError(f"cannot evaluate {node!r}")


def query_range(expr: str, store: SeriesStore, times: list[float]) -> dict[Labels, list[float]]:
    """expr at each of `times` (Prometheus' /query_range): {labels: values}, NaN where absent."""
    node = parse(expr)
    out: dict[Labels, list[float]] = {}
    for i, t in enumerate(times):
        vec = evaluate(node, store, t)
        if not isinstance(vec, dict):
            vec = {frozenset(): vec}
        for k, v in vec.items():
            out.setdefault(k, [math.nan] * len(times))[i] = v
    return out


def legend(fmt: str | None, labels: Labels) -> str:
    """Grafana's legendFormat: {{label}} replaced by the series' value ("" when it has none)."""
    d = dict(labels)
    if not fmt:
        inner = ", ".join(f'{k}="{v}"' for k, v in sorted(d.items()) if k != "__name__")
        return f"{d.get('__name__', '')}{{{inner}}}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: d.get(m.group(1), ""), fmt)
