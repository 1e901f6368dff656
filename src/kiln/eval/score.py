"""Scoring a backend (kiln.eval.backends) on a task's examples (kiln.eval.tasks).

Multiple choice follows lm-evaluation-harness: each choice is the continuation " " + choice of
the context (trailing whitespace of the context moves to the continuation; context and
continuation are split after tokenizing them together); acc takes the argmax of the summed
log-likelihoods, acc_norm of log-likelihood / len(choice in characters). An example longer than
the model's context is skipped and counted, not truncated.
"""

from __future__ import annotations

import math
import re

from tqdm import tqdm

from kiln.errors import ConfigError


def encode_pair(backend, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's _encode_pair for causal models."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = backend.encode(context + continuation)
    ctx = backend.encode(context)
    return ctx, whole[len(ctx) :]


def run_mc(backend, examples: list[dict], delimiter: str = " ", progress=True, chunk=64) -> dict:
    """{"acc", "acc_norm", "examples", "skipped", "loglikelihoods": per example, per choice}
    (None for a skipped example). `chunk` examples go to the backend at once."""
    correct = correct_norm = skipped = 0
    lls: list[list[float] | None] = []
    bar = tqdm(total=len(examples), desc="multiple choice", unit="example", disable=not progress)
    for start in range(0, len(examples), chunk):
        batch = examples[start : start + chunk]
        pairs = [[encode_pair(backend, ex["context"], delimiter + c) for c in ex["choices"]]
                 for ex in batch]  # fmt: skip
        fits = [max(len(a) + len(b) for a, b in p) <= backend.max_len for p in pairs]
        todo = [pair for p, ok in zip(pairs, fits) if ok for pair in p]
        flat = backend.loglikelihood(todo) if todo else []
        for ex, p, ok in zip(batch, pairs, fits):
            if not ok:
                skipped += 1
                lls.append(None)
                continue
            scores = [lp for lp, _ in flat[: len(p)]]
            flat = flat[len(p) :]
            lls.append(scores)
            norm = [s / len(c) for s, c in zip(scores, ex["choices"])]
            correct += max(range(len(scores)), key=scores.__getitem__) == ex["answer"]
            correct_norm += max(range(len(norm)), key=norm.__getitem__) == ex["answer"]
        bar.update(len(batch))
    bar.close()
    n = len(examples) - skipped
    return {"acc": correct / n if n else math.nan, "acc_norm": correct_norm / n if n else math.nan,
            "examples": n, "skipped": skipped, "loglikelihoods": lls}  # fmt: skip


def extract(text: str, regex: str | None) -> str:
    """The first match of regex in text (its first group, if it has one), else the stripped
    text; "" when the regex finds nothing."""
    if regex is None:
        return text.strip()
    m = re.search(regex, text)
    if m is None:
        return ""
    return (m.group(1) if m.groups() else m.group(0)).strip()


def bleu(hyps: list[str], refs: list[str]) -> float:
    """Corpus BLEU (sacrebleu's defaults), 0-100."""
    try:
        import sacrebleu
    except ImportError:
        raise ConfigError("BLEU needs sacrebleu: pip install 'kiln[eval]'") from None
    return sacrebleu.corpus_bleu(hyps, [refs]).score


def rouge_l(hyps: list[str], refs: list[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score, stemmed), 0-1."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ConfigError("ROUGE-L needs rouge-score: pip install 'kiln[eval]'") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]
    return sum(scores) / len(scores)


METRICS = ("exact_match", "bleu", "rouge_l")


def run_gen(backend, examples: list[dict], metrics=("exact_match",), max_tokens: int = 16,
            stop=("\n\n",), regex: str | None = None, progress=True) -> dict:  # fmt: skip
    """Greedy generation scored against each example's target: exact_match (after `regex`
    extraction), BLEU, ROUGE-L; {"<metric>": value, "examples", "skipped", "outputs"}."""
    kept, skipped = [], 0
    for ex in examples:
        if len(backend.encode(ex["prompt"])) + max_tokens > backend.max_len:
            skipped += 1
        else:
            kept.append(ex)
    outs = []
    bar = tqdm(total=len(kept), desc="generate", unit="example", disable=not progress)
    for i in range(0, len(kept), 32):
        outs += backend.generate([ex["prompt"] for ex in kept[i : i + 32]], max_tokens, list(stop))
        bar.update(len(kept[i : i + 32]))
    bar.close()
    refs = [ex["target"] for ex in kept]
    r = {"examples": len(kept), "skipped": skipped, "outputs": outs}
    for m in metrics:
        if not kept:
            r[m] = math.nan
        elif m == "exact_match":
            hits = [extract(o, regex) == extract(t, regex) for o, t in zip(outs, refs)]
            r[m] = sum(hits) / len(hits)
        elif m == "bleu":
            r[m] = bleu([o.strip() for o in outs], refs)
        elif m == "rouge_l":
            r[m] = rouge_l([o.strip() for o in outs], refs)
    return r


def run_ppl(backend, text: str, max_len: int, stride: int, progress=True) -> dict:
    """Perplexity and bits per byte of `text` through a backend's token_logprobs, windowed as
    kiln.eval.ppl.windows (the transformers-docs convention)."""
    from kiln.eval.ppl import windows

    ids = backend.encode(text, special=True)  # as `kiln eval ppl --model` and transformers
    nll, scored = 0.0, 0
    spans = windows(len(ids), max_len, stride)
    for begin, end, first in tqdm(spans, desc="perplexity", unit="window", disable=not progress):
        lps = backend.token_logprobs([ids[begin:end]])[0]  # lps[i] scores ids[begin + 1 + i]
        nll -= sum(lps[first - begin - 1 :])
        scored += end - first
    return ppl_result(nll, scored, text)


def ppl_result(nll_sum: float, tokens: int, text: str) -> dict:
    """Perplexity exp(nll / tokens) and bits per byte nll / ln 2 / UTF-8 bytes of the text."""
    return {"perplexity": math.exp(nll_sum / tokens),
            "bits_per_byte": nll_sum / math.log(2) / len(text.encode("utf-8")),
            "tokens": tokens}  # fmt: skip
