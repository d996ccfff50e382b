"""`grm-bon`: best-of-n with a vLLM policy and the reward server, and over-optimisation curves.

    # n candidates per prompt from vLLM (in this process, or a running vLLM server), ranked by grm-serve
    grm-bon --input prompts.jsonl --output best.jsonl --n 8 --reward.target localhost:50051
    grm-bon --input prompts.jsonl --output best.jsonl --policy.url http://localhost:8000

    # over-optimisation curves on the bundled benchmark's held-out prompts (docs/bon.md)
    grm-bon --eval --curve.out runs/bon-eval --curve.reward_models bt=localhost:50052,grm=localhost:50051

Input lines are `{"prompt": "text" | [messages], "id": ...}` (or `{"messages": [...]}`); each output
line is the input record plus `best`, `best_score`, `best_index`, `candidates`, `scores` and
`distinct` (how many distinct candidates were scored: identical ones are scored once). The reward
server is checked before vLLM starts, so a wrong address fails in seconds. The loop itself is
`grmserve.clients.best_of_n` (no torch, no training code); this module adds the command line and
`--eval`, which needs the benchmark's gold reward (`bon_eval.py`).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from grmserve.clients.best_of_n import (
    BestOfN,
    Generator,
    PolicyError,
    SamplingConfig,
    connect_reward,
    make_generator,
    read_prompts,
)
from grmserve.clients.reward_client import RewardClient, RewardServerError

from .core import env
from .core.configtools import fail, parse_command

log = logging.getLogger(__name__)
PROG = "grm-bon"


@dataclass(kw_only=True)
class PolicyConfig:
    """The policy that samples candidates: vLLM in this process, or a running vLLM server."""

    model: str = ""
    """Offline engine: a Hugging Face checkpoint folder or name (empty: SmolLM2-135M-Instruct, converted
    from the local GGUF). With --policy.url: the served model's name (empty: the server's first)."""
    url: str = ""
    """Base URL of a running vLLM OpenAI-compatible server (e.g. http://localhost:8000); empty: run
    vLLM's offline engine here."""
    temperature: float = 0.8
    """Sampling temperature."""
    top_p: float = 0.95
    """Nucleus sampling."""
    max_tokens: int = 256
    """Tokens per candidate at most."""
    seed: int = 0
    """The offline engine's sampling seed (vLLM-CPU has no per-request seeds)."""
    dtype: str = "auto"
    """Offline engine dtype (auto: float32 on CPU, the checkpoint's dtype on GPU)."""
    max_model_len: int = 2048
    """Offline engine: longest prompt + response in tokens."""
    kv_cache_gib: float = 2.0
    """Offline engine on CPU: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE, unless set)."""


@dataclass(kw_only=True)
class RewardConfig:
    """The reward server that ranks the candidates."""

    target: str = "localhost:50051"
    """Reward server address (host:port, several comma-separated, or dns:///name:port); the token
    comes from $GRM_SERVE_TOKEN."""
    timeout: float = 120.0
    """Seconds per ScoreCandidates call."""
    wait_seconds: float = 30.0
    """How long to wait for the server to report SERVING before giving up."""
    concurrency: int = 8
    """ScoreCandidates calls in flight at once (the server batches them)."""
    truncate: bool = False
    """Let the server truncate too-long pairs instead of refusing them."""


@dataclass(kw_only=True)
class CurveConfig:
    """--eval: over-optimisation curves on the benchmark's held-out prompts."""

    out: str = "runs/bon-eval"
    """Folder for the cached samples and scores (resumable) and curves.json / curves.png."""
    splits: list[str] = field(default_factory=lambda: ["test_id", "test_ood"])
    """Benchmark splits whose prompts are sampled."""
    prompts: int = 48
    """Prompts per split (a seeded random subset; 0: all 300)."""
    samples: int = 32
    """N: candidates sampled per prompt, once (the curves go n = 1, 2, 4, ... N)."""
    reward_models: list[str] = field(default_factory=list)
    """Proxy reward models as name=host:port (e.g. bt=localhost:50052,grm=localhost:50051); empty:
    --reward.target, named by its model version."""
    seed: int = 0
    """Seed of the prompt subset."""


@dataclass(kw_only=True)
class BonConfig:
    """grm-bon: best-of-n through vLLM, ranked by the reward server."""

    input: str = ""
    """JSONL prompts, one {"prompt": text | [messages]} or {"messages": [...]} per line (not with --eval)."""
    output: str = ""
    """JSONL results (empty: standard output)."""
    n: int = 8
    """Candidates per prompt."""
    batch_prompts: int = 8
    """Prompts per generation batch (with --overlap, one batch is scored while the next is generated)."""
    overlap: bool = True
    """Generate the next batch while the reward server scores the current one."""
    eval: bool = False
    """Draw over-optimisation curves (see --curve.*) instead of reading --input."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    curve: CurveConfig = field(default_factory=CurveConfig)


def sampling(cfg: PolicyConfig) -> SamplingConfig:
    return SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens)


def build_generator(cfg: PolicyConfig) -> Generator:
    """The policy: a client of the vLLM server at `cfg.url`, else vLLM's offline engine on `cfg.model`
    (SmolLM2-135M-Instruct when empty)."""
    model = cfg.model
    if not model and not cfg.url:
        from .core import assets

        model = str(assets.smollm2_dir())
    return make_generator(model=model, url=cfg.url, sampling=sampling(cfg), dtype=cfg.dtype,
                          max_model_len=cfg.max_model_len, kv_cache_gib=cfg.kv_cache_gib, seed=cfg.seed)


def connect(target: str, cfg: RewardConfig) -> RewardClient:
    """A client of the reward server at `target` that reports SERVING (TimeoutError naming it otherwise)."""
    return connect_reward(target, token=env.auth_token(), timeout=cfg.timeout, wait_seconds=cfg.wait_seconds)


def run_bon(cfg: BonConfig) -> int:
    """Best-of-n over the prompts of `cfg.input`; results to `cfg.output`. Returns the number of prompts."""
    from tqdm import tqdm

    if not cfg.input:
        raise ValueError("--input is required (a JSONL file of prompts), or pass --eval")
    items = read_prompts(cfg.input)
    reward = connect(cfg.reward.target, cfg.reward)  # before vLLM: a wrong address fails in seconds
    generator = build_generator(cfg.policy)
    out = open(cfg.output, "w", encoding="utf-8") if cfg.output else sys.stdout
    try:
        bon = BestOfN(generator, reward, n=cfg.n, batch_prompts=cfg.batch_prompts, overlap=cfg.overlap,
                      score_concurrency=cfg.reward.concurrency, truncate=cfg.reward.truncate)
        with tqdm(total=len(items), desc=f"best-of-{cfg.n}", unit="prompt", file=sys.stderr) as bar:
            for result in bon.run(items):
                out.write(json.dumps(result.to_record(), ensure_ascii=False) + "\n")
                out.flush()
                bar.update(1)
    finally:
        if out is not sys.stdout:
            out.close()
        generator.close()
        reward.close()
    return len(items)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_command(BonConfig, argv, prog=PROG, description=__doc__.split("\n\n")[0], start=BonConfig())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        if cfg.eval:
            from .bon_eval import run_eval

            print(Path(run_eval(cfg, build_generator=build_generator, connect=connect)) / "curves.json")
        else:
            count = run_bon(cfg)
            log.info("best-of-%d done for %d prompts%s", cfg.n, count, f" -> {cfg.output}" if cfg.output else "")
    except (PolicyError, RewardServerError, TimeoutError, ValueError, FileNotFoundError, ImportError) as exc:
        return fail(PROG, exc)
    return 0


if __name__ == "__main__":  # vLLM starts worker processes: the guard is required
    raise SystemExit(main())
