"""Guardrails: checks on what goes into a model and what comes out. Input: prompt-injection
heuristics (plus a classifier hook), PII detection and redaction (presidio), a denylist of
topics. Output: PII, a regex or JSON the answer must match, a moderation hook. A StreamFilter
applies the output checks to a stream of deltas. The server's middleware is
kiln.serve.guardrails; the config is a TOML or JSON file (GuardrailsConfig.from_file)."""

from __future__ import annotations

import importlib
import json
import logging
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError

log = logging.getLogger("kiln.guardrails")

PII_ACTIONS = ("off", "detect", "redact", "block")
DEFAULT_ENTITIES = ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IBAN_CODE",
                    "IP_ADDRESS"]  # fmt: skip

# Phrases of known prompt-injection and jailbreak attempts, with a weight each; a text's
# score is the sum of the weights of the patterns it matches, capped at 1.
INJECTION_PATTERNS = [
    (r"\b(ignore|disregard|forget|override|bypass)\b.{0,40}\b(previous|prior|above|earlier|"
     r"preceding|all|your|the)\b.{0,30}\b(instructions?|prompts?|rules|directions|guidelines|"
     r"context|messages?)\b", 0.9),
    (r"\b(reveal|print|show|repeat|output|leak|tell me)\b.{0,40}\b(system|hidden|secret|"
     r"initial|original)\s+(prompt|instructions?|message|rules)\b", 0.8),
    (r"\byou are (now|no longer)\b.{0,60}\b(DAN|unfiltered|unrestricted|jailbr\w*|evil|"
     r"without (any )?(rules|restrictions|limits|filters))", 0.8),
    (r"\b(do anything now|developer mode|jailbreak|jailbroken|god mode)\b", 0.7),
    (r"\b(pretend|act|behave|respond)\b.{0,40}\b(no|without)\b.{0,20}\b(rules|restrictions|"
     r"limits|filters|guidelines|censorship)\b", 0.7),
    (r"\bnew (system )?instructions?\s*:", 0.6),
    (r"</?\s*(system|instructions?)\s*>|\[/?(INST|SYS)\]|<\|im_start\|>\s*system", 0.6),
    (r"\bfrom now on\b.{0,60}\b(you will|you must|always|never)\b", 0.4),
]  # fmt: skip


def load_hook(spec: str) -> Callable[..., Any]:
    """A function named "package.module:function" (a classifier or moderation hook)."""
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"guardrails: cannot load the hook {spec!r} ({e})") from None


@dataclass
class InputChecks:
    injection: bool = True  # the heuristics above
    injection_threshold: float = 0.5
    classifier: str | None = None  # "module:fn", fn(text) -> injection probability
    pii: str = "redact"  # off | detect (count only) | redact | block
    pii_entities: list[str] = field(default_factory=lambda: list(DEFAULT_ENTITIES))
    denylist: list[str] = field(default_factory=list)  # phrases/regexes that block a request


@dataclass
class OutputChecks:
    pii: str = "redact"
    pii_entities: list[str] = field(default_factory=lambda: list(DEFAULT_ENTITIES))
    denylist: list[str] = field(default_factory=list)
    regex: str | None = None  # a whole answer must match it (re.fullmatch) or is blocked
    json: bool = False  # a whole answer must be JSON or is blocked
    moderation: str | None = None  # "module:fn", fn(text) -> a reason to block, or None


@dataclass
class GuardrailsConfig:
    input: InputChecks = field(default_factory=InputChecks)
    output: OutputChecks = field(default_factory=OutputChecks)
    spacy_model: str | None = None  # an installed spaCy model (en_core_web_sm) for names, places

    @classmethod
    def from_file(cls, path: str | Path) -> GuardrailsConfig:
        """A config from TOML (.toml) or JSON: tables [input] and [output] of the fields above."""
        path = Path(path)
        try:
            text = path.read_text()
            raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as e:
            raise ConfigError(f"guardrails config {path}: {e}") from None
        return cls.from_dict(raw, f"guardrails config {path}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "guardrails") -> GuardrailsConfig:
        unknown = set(raw) - {"input", "output", "spacy_model"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (input, output, "
                              "spacy_model)")  # fmt: skip
        parts = {}
        for name, kind in (("input", InputChecks), ("output", OutputChecks)):
            given = raw.get(name, {})
            known = {f.name for f in fields(kind)}
            if not isinstance(given, dict) or set(given) - known:
                bad = sorted(set(given) - known) if isinstance(given, dict) else given
                raise ConfigError(f"{where}: [{name}] has unknown keys {bad}; known: "
                                  f"{sorted(known)}")  # fmt: skip
            parts[name] = kind(**given)
            if parts[name].pii not in PII_ACTIONS:
                raise ConfigError(f"{where}: [{name}] pii must be one of {PII_ACTIONS}, got "
                                  f"{parts[name].pii!r}")  # fmt: skip
        return cls(**parts, spacy_model=raw.get("spacy_model"))


@dataclass
class Decision:
    stage: str  # input | output
    check: str  # injection | pii | denylist | regex | json | moderation
    action: str  # block | redact | detect
    detail: str


class Blocked(Exception):
    """A text a check refuses; `decision` says which and why."""

    def __init__(self, decision: Decision):
        super().__init__(f"{decision.stage} blocked by {decision.check}: {decision.detail}")
        self.decision = decision


def injection_score(text: str) -> float:
    """The heuristic prompt-injection score of `text` in [0, 1]."""
    score = sum(w for p, w in INJECTION_PATTERNS if re.search(p, text, re.I | re.S))
    return min(score, 1.0)


class PIIScanner:
    """presidio's pattern recognizers (email, phone, credit card with Luhn, SSN, IBAN with
    checksum, IP, ...) over a blank spaCy English pipeline: no model to download. Names and
    places need NER: set `spacy_model` to an installed model (en_core_web_sm) for those."""

    def __init__(self, entities: list[str], spacy_model: str | None = None):
        import spacy
        import tldextract
        from presidio_analyzer import AnalyzerEngine
        from presidio_analyzer.nlp_engine import SpacyNlpEngine

        # the email recognizer's domain check would fetch the public suffix list online;
        # the snapshot bundled with tldextract is enough
        tldextract.tldextract.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=())

        class Blank(SpacyNlpEngine):
            def load(self) -> None:
                if not spacy_model:
                    self.nlp = {"en": spacy.blank("en")}
                    return
                try:
                    self.nlp = {"en": spacy.load(spacy_model)}
                except OSError:
                    raise ConfigError(f"guardrails: the spaCy model {spacy_model!r} is not "
                                      "installed") from None  # fmt: skip

        # one warning per recognizer of another language otherwise, at every start
        logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
        nlp = Blank(models=[{"lang_code": "en", "model_name": spacy_model or "blank"}])
        nlp.load()
        self.analyzer = AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"])
        self.entities = entities

    def find(self, text: str):
        """presidio's RecognizerResults (entity_type, start, end, score) in `text`."""
        return self.analyzer.analyze(text, language="en", entities=self.entities)

    def redact(self, text: str, found=None) -> str:
        """`text` with each entity replaced by <ENTITY_TYPE> (of overlapping ones, the one
        starting first, then the likelier)."""
        found = self.find(text) if found is None else found
        out, end = [], 0
        for r in sorted(found, key=lambda r: (r.start, -r.score)):
            if r.start >= end:
                out += [text[end : r.start], f"<{r.entity_type}>"]
                end = r.end
        return "".join(out) + text[end:]


class Guardrails:
    """The checks of a GuardrailsConfig; `on_decision(decision)` is called for each decision
    (the server logs it and counts it in /metrics)."""

    def __init__(
        self, config: GuardrailsConfig, on_decision: Callable[[Decision], None] | None = None
    ):
        self.config = config
        self.on_decision = on_decision or (lambda d: None)
        entities = set()
        for checks in (config.input, config.output):
            if checks.pii != "off":
                entities |= set(checks.pii_entities)
        self.pii = PIIScanner(sorted(entities), config.spacy_model) if entities else None
        self.classifier = load_hook(config.input.classifier) if config.input.classifier else None
        self.moderation = load_hook(config.output.moderation) if config.output.moderation else None
        self.denied = {
            stage: re.compile("|".join(f"(?:{p})" for p in checks.denylist), re.I)
            for stage, checks in (("input", config.input), ("output", config.output))
            if checks.denylist
        }
        self.output_regex = re.compile(config.output.regex, re.S) if config.output.regex else None

    def decide(self, stage: str, check: str, action: str, detail: str) -> Decision:
        d = Decision(stage, check, action, detail)
        log.info("guardrails: %s %s %s (%s)", stage, check, action, detail)
        self.on_decision(d)
        return d

    def _hook(self, stage: str, check: str, fn: Callable[[str], Any], text: str) -> Any:
        """A hook's answer; one that raises blocks (a broken guard fails closed, logged)."""
        try:
            return fn(text)
        except Exception as e:
            log.error("guardrails: the %s hook failed: %r", check, e)
            raise Blocked(self.decide(stage, check, "block", f"the hook failed: {e!r}")) from None

    def _pii(self, stage: str, text: str, action: str, entities: list[str]) -> str:
        if action == "off" or self.pii is None:
            return text
        found = [r for r in self.pii.find(text) if r.entity_type in entities]
        if not found:
            return text
        kinds = ", ".join(sorted({r.entity_type for r in found}))
        if action == "block":
            raise Blocked(self.decide(stage, "pii", "block", kinds))
        self.decide(stage, "pii", action, kinds)
        return self.pii.redact(text, found) if action == "redact" else text

    def _denylist(self, stage: str, text: str) -> None:
        pattern = self.denied.get(stage)
        m = pattern.search(text) if pattern else None
        if m:
            raise Blocked(self.decide(stage, "denylist", "block", repr(m.group())))

    def check_input(self, text: str) -> str:
        """`text` as the model may see it (PII redacted when so configured); Blocked if not."""
        c = self.config.input
        self._denylist("input", text)
        if c.injection:
            score = injection_score(text)
            if self.classifier is not None:
                score = max(score, float(self._hook("input", "injection", self.classifier, text)))
            if score >= c.injection_threshold:
                raise Blocked(self.decide("input", "injection", "block", f"score {score:.2f}"))
        return self._pii("input", text, c.pii, c.pii_entities)

    def check_output_text(self, text: str) -> str:
        """The checks that apply to any part of an answer (streamed or not): denylist,
        moderation and PII."""
        c = self.config.output
        self._denylist("output", text)
        if self.moderation is not None:
            reason = self._hook("output", "moderation", self.moderation, text)
            if reason:
                raise Blocked(self.decide("output", "moderation", "block", str(reason)))
        return self._pii("output", text, c.pii, c.pii_entities)

    def check_output_whole(self, text: str) -> None:
        """The checks only a whole answer can pass: the regex and JSON validation."""
        if self.output_regex is not None and not self.output_regex.fullmatch(text):
            raise Blocked(self.decide("output", "regex", "block", "the answer does not match"))
        if self.config.output.json:
            try:
                json.loads(text)
            except ValueError as e:
                raise Blocked(self.decide("output", "json", "block", f"not JSON: {e}")) from None

    def check_output(self, text: str) -> str:
        """A whole answer after every output check; Blocked if it fails one."""
        text = self.check_output_text(text)
        self.check_output_whole(text)
        return text

    def stream_filter(self) -> StreamFilter:
        return StreamFilter(self)


class StreamFilter:
    """The output checks over a stream of deltas. The last `holdback` characters are held
    until more text comes (so a phone number split across two deltas is still found whole),
    and an entity that reaches into the held part is held with it; `feed` returns the text
    that may be sent now, `finish` the rest (and runs the whole-answer checks). Blocked from
    either stops the stream."""

    holdback = 64  # longer than any entity the pattern recognizers find (an IBAN is <= 42)

    def __init__(self, guard: Guardrails):
        self.guard = guard
        self.pending = ""  # received, not yet sent
        self.received = ""  # all of it (a denylisted phrase may span deltas)
        self.sent: list[str] = []  # what was sent, after redaction

    def _release(self, upto: int) -> str:
        out = self.guard.check_output_text(self.pending[:upto]) if upto else ""
        self.pending = self.pending[upto:]
        self.sent.append(out)
        return out

    def feed(self, delta: str) -> str:
        self.pending += delta
        self.received += delta
        self.guard._denylist("output", self.received)
        cut = len(self.pending) - self.holdback
        if cut <= 0:
            return ""
        pii = self.guard.pii if self.guard.config.output.pii != "off" else None
        if pii is not None:
            for r in pii.find(self.pending):
                if r.start < cut < r.end:
                    cut = r.start
        cut = self.pending.rfind(" ", 0, cut) + 1 or cut  # whole words to the denylist
        return self._release(cut)

    def finish(self) -> str:
        out = self._release(len(self.pending))
        self.guard.check_output_whole("".join(self.sent))
        return out


def load_eval_set(path: str | Path | None = None) -> list[dict[str, Any]]:
    """Labelled texts {text, injection: bool, pii: [entity types]}; the bundled set by default."""
    if path is None:
        path = Path(__file__).parent.parent / "data" / "apps" / "guardrails_eval.jsonl"
    return [json.loads(line) for line in open(path) if line.strip()]


def _precision_recall(tp: int, fp: int, fn: int) -> dict[str, float]:
    return {"precision": tp / (tp + fp) if tp + fp else 1.0,
            "recall": tp / (tp + fn) if tp + fn else 1.0}  # fmt: skip


def evaluate(guard: Guardrails, items: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Precision and recall of the input checks: injection blocking per text, and PII
    detection per (text, entity type)."""
    inj = [0, 0, 0]  # tp, fp, fn
    pii = [0, 0, 0]
    threshold = guard.config.input.injection_threshold
    for item in items:
        score = injection_score(item["text"])
        if guard.classifier is not None:
            score = max(score, float(guard.classifier(item["text"])))
        flagged, truth = score >= threshold, item["injection"]
        inj[0] += flagged and truth
        inj[1] += flagged and not truth
        inj[2] += truth and not flagged
        if guard.pii is not None:
            found = {r.entity_type for r in guard.pii.find(item["text"])}
            want = set(item["pii"])
            pii[0] += len(found & want)
            pii[1] += len(found - want)
            pii[2] += len(want - found)
    return {"injection": _precision_recall(*inj), "pii": _precision_recall(*pii)}
