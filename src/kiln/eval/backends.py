"""What the evaluation tasks ask of a model, from two places: a model directory run in process
(kiln.LLM) or any OpenAI-compatible server (`/v1/completions` with echo + logprobs, as
lm-evaluation-harness's `local-completions` asks it).

  encode(text, special=False) -> ids        the model's tokenizer (special: add BOS etc.)
  loglikelihood([(context_ids, continuation_ids)]) -> [(sum logprob, is_greedy)]
  token_logprobs([ids]) -> [[logprob of ids[i] given ids[:i]] for i >= 1]
  generate([prompt], max_tokens, stop) -> [text]     greedy
  max_len                                   the context, in tokens
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from kiln.errors import InputError


class LocalBackend:
    """A model directory through kiln.LLM (fp32 on CPU unless dtype/device say otherwise)."""

    def __init__(self, model: str, dtype=None, device=None, **engine_args):
        from kiln.engine.llm import LLM

        self.llm = LLM(model, dtype=dtype, device=device, **engine_args)
        self.tokenizer = self.llm.tokenizer
        self.max_len = self.llm.engine.max_model_len
        self.path, self.name = model, os.path.basename(os.path.normpath(model))

    def encode(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=special)

    def _prompt_logprobs(self, prompts: list[list[int]]) -> list[list[dict[int, float]]]:
        from kiln.engine.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
        outs = self.llm.generate(prompt_token_ids=prompts, sampling_params=params)
        return [o.prompt_logprobs[1:] for o in outs]

    def token_logprobs(self, prompts: list[list[int]]) -> list[list[float]]:
        rows = self._prompt_logprobs(prompts)
        return [[d[t] for d, t in zip(r, p[1:])] for r, p in zip(rows, prompts)]

    def loglikelihood(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        rows = self._prompt_logprobs([c + x for c, x in pairs])
        out = []
        for (ctx, cont), r in zip(pairs, rows):
            scored = r[len(ctx) - 1 :]  # r[i] scores token i + 1
            lp = sum(d[t] for d, t in zip(scored, cont))
            greedy = all(max(d, key=d.get) == t for d, t in zip(scored, cont))
            out.append((lp, greedy))
        return out

    def generate(self, prompts: list[str], max_tokens: int, stop: list[str]) -> list[str]:
        from kiln.engine.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0, stop=stop)
        ids = [self.tokenizer.encode(p) for p in prompts]
        return [o.outputs[0].text for o in self.llm.generate(prompt_token_ids=ids,
                                                              sampling_params=params)]  # fmt: skip


def post(url: str, body: dict | None = None, api_key: str | None = None, timeout=600) -> dict:
    """One JSON request (GET without a body); HTTP errors become InputError with the server's
    message."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:300]
        raise InputError(f"{url}: HTTP {e.code}: {detail}") from None
    except urllib.error.URLError as e:
        raise InputError(f"{url}: cannot connect ({e.reason})") from None


class OpenAIBackend:
    """Any OpenAI-compatible server. Prompts go as token ids (the server's /tokenize, or the
    tokenizer of --tokenizer DIR); log-likelihoods come from echo + logprobs."""

    def __init__(self, base_url: str, model: str | None = None, tokenizer: str | None = None,
                 api_key: str | None = None):  # fmt: skip
        self.base = base_url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY")
        cards = post(f"{self.base}/v1/models", api_key=self.api_key).get("data") or []
        if model is None:
            if not cards:
                raise InputError(f"{self.base}/v1/models lists no model: pass --served-model")
            model = cards[0]["id"]
        self.model = self.name = model
        card = next((c for c in cards if c.get("id") == model), {})
        self.max_len = card.get("max_model_len") or 2**31
        self.tokenizer = None
        if tokenizer is not None:
            from kiln.tokenizer.hf import load_tokenizer

            self.tokenizer = load_tokenizer(tokenizer)

    def encode(self, text: str, special: bool = False) -> list[int]:
        if self.tokenizer is not None:
            return self.tokenizer.encode(text, add_special_tokens=special)
        try:
            body = {"model": self.model, "prompt": text, "add_special_tokens": special}
            return post(f"{self.base}/tokenize", body, self.api_key)["tokens"]
        except (InputError, KeyError):
            raise InputError(
                f"{self.base} has no /tokenize endpoint (vLLM's): pass --tokenizer DIR "
                "with the served model's tokenizer"
            ) from None

    def _completion(self, prompt, **kw) -> dict:
        body = {"model": self.model, "prompt": prompt, "temperature": 0, **kw}
        return post(f"{self.base}/v1/completions", body, self.api_key)

    def token_logprobs(self, prompts: list[list[int]]) -> list[list[float]]:
        out = []
        for ids in prompts:
            r = self._completion(ids, max_tokens=1, echo=True, logprobs=1)
            lps = ((r.get("choices") or [{}])[0].get("logprobs") or {}).get("token_logprobs")
            if not lps or len(lps) < len(ids) or any(x is None for x in lps[1 : len(ids)]):
                raise InputError(
                    f"{self.base}/v1/completions did not return prompt logprobs (echo=true with "
                    "logprobs): this task needs the server's log-likelihood support"
                )
            out.append([float(x) for x in lps[1 : len(ids)]])
        return out

    def loglikelihood(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        out = []
        for ctx, cont in pairs:
            ids = ctx + cont
            r = self._completion(ids, max_tokens=1, echo=True, logprobs=1)
            lp = (r.get("choices") or [{}])[0].get("logprobs") or {}
            lps, tops = lp.get("token_logprobs"), lp.get("top_logprobs")
            if not lps or not tops or len(lps) < len(ids):
                raise InputError(
                    f"{self.base}/v1/completions did not return prompt logprobs and "
                    "top_logprobs (echo=true, logprobs=1): multiple choice needs them"
                )
            n = len(ctx)
            tokens = lp.get("tokens") or []
            greedy = all(
                max(top, key=top.get) == tok for top, tok in zip(tops[n : len(ids)], tokens[n:])
            )
            out.append((float(sum(lps[n : len(ids)])), greedy))
        return out

    def generate(self, prompts: list[str], max_tokens: int, stop: list[str]) -> list[str]:
        out = []
        for p in prompts:
            r = self._completion(p, max_tokens=max_tokens, **({"stop": stop} if stop else {}))
            out.append(r["choices"][0]["text"])
        return out


def backend(args) -> LocalBackend | OpenAIBackend:
    """The backend that parsed --model / --base-url name."""
    if (args.model is None) == (args.base_url is None):
        raise InputError("give --model DIR or --base-url URL (one of them)")
    if args.base_url:
        return OpenAIBackend(args.base_url, args.served_model, args.tokenizer)
    from kiln.engine.config import EngineConfig

    return LocalBackend(args.model, args.dtype, args.device, **EngineConfig.args_from(args))
