"""Rollouts: prompts, the policy with its value head, sampling, and remote scoring.

- `load_prompt_rows`: training prompts from the bundled benchmark or a JSONL file.
- `PolicyWithValue`: the causal LM plus a linear value head on its final hidden state; one forward
  gives the response tokens' logits and values (the prompt positions skip the LM head).
- `collate`: (prompt ids, response ids) pairs → left-padded prompts + right-padded responses.
- `generate`: sample responses (transformers generate) and cut each at its first end-of-turn token.
- `RemoteScorer`: scores (chat prompt, response) pairs through `RewardClient`, on a background thread
  so that scoring one chunk overlaps generating the next; rides out a restarting server for
  `patience_s` and then raises `RewardServiceDown`; a score that is missing or not finite raises
  `ScoreError` (never a silent zero).

    >>> check_scores([0.5, -1.0], expected=2, target="rm:50051")
    [0.5, -1.0]
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import grpc
import torch
from torch import nn

from grmserve.clients.reward_client import RewardClient, RewardServerError

from .config import RewardConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Prompts


def load_prompt_rows(source: str, split: str, *, limit: int = 0) -> list[dict]:
    """Prompt rows ({"messages": [...], optional "constraints"}) from `benchmark` (the bundled
    instruction-following benchmark, split `split`) or a JSONL file of {"messages": [...]} or
    {"prompt": "..."} rows (a plain prompt becomes one user message)."""
    if source == "benchmark":
        from ..benchmark import load_prompts

        rows = load_prompts(split)
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"prompt file {path} does not exist (or pass --data.prompts benchmark)")
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "messages" not in row:
                if not isinstance(row.get("prompt"), str):
                    raise ValueError(f"{path}:{n}: a prompt row needs \"messages\" (chat) or \"prompt\" (text)")
                row = {**row, "messages": [{"role": "user", "content": row["prompt"]}]}
            rows.append(row)
    if not rows:
        raise ValueError(f"no prompts in {source} (split {split})")
    return rows[:limit] if limit else rows


def encode_prompts(tokenizer, rows: list[dict], max_tokens: int) -> tuple[list[dict], list[list[int]]]:
    """Rows whose chat-rendered prompt fits in `max_tokens`, and their token ids (no special tokens
    added: the template brings its own, as the reward server renders it)."""
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) for r in rows]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    kept = [(r, i) for r, i in zip(rows, ids) if len(i) <= max_tokens]
    if not kept:
        raise ValueError(f"every prompt is longer than rollout.max_prompt_tokens={max_tokens}")
    return [r for r, _ in kept], [i for _, i in kept]


# ---------------------------------------------------------------------------------------------
# The policy and its value head


class PolicyWithValue(nn.Module):
    """A causal LM (`lm`, peft-wrapped with LoRA or plain) and a value head `v_head` reading the
    final hidden state. `forward` returns, for the response positions only, (logits, values) —
    the logits are divided by `temperature` so that they are the sampling distribution."""

    def __init__(self, lm: nn.Module, *, init_std: float = 0.0):
        super().__init__()
        self.lm = lm
        self.v_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.normal_(self.v_head.weight, std=init_std) if init_std else nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int, lm: nn.Module | None = None
               ) -> torch.Tensor:
        """(B, R, H) final hidden states at the positions that predict the response tokens (from `start`)."""
        lm = self.lm if lm is None else lm
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded rows
        out = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False)
        return out.last_hidden_state[:, start - 1:-1]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int, temperature: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hidden(input_ids, attention_mask, start)  # (B, R, H)
        logits = self.lm.get_output_embeddings()(h).float() / temperature  # (B, R, V)
        values = self.v_head(h).squeeze(-1).float()  # (B, R)
        return logits, values


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under `logits`: (B, R, V), (B, R) → (B, R)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@dataclass
class Collated:
    """A batch of (prompt, response) rows: prompts left-padded to `start` tokens, responses right-padded."""

    input_ids: torch.Tensor  # (B, start + R)
    attention_mask: torch.Tensor  # (B, start + R)
    response: torch.Tensor  # (B, R) response token ids (pad after the end)
    mask: torch.Tensor  # (B, R) 1.0 on response tokens
    start: int


def collate(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
            device: torch.device | str = "cpu") -> Collated:
    """Left-pad prompts and right-pad responses into one (B, P + R) batch.

    >>> c = collate([[5, 6], [7]], [[1], [2, 3]], pad_id=0)
    >>> c.input_ids.tolist(), c.mask.tolist(), c.start
    ([[5, 6, 1, 0], [0, 7, 2, 3]], [[1.0, 0.0], [1.0, 1.0]], 2)
    """
    p = max(len(x) for x in prompts)
    r = max(len(x) for x in responses)
    ids = torch.full((len(prompts), p + r), pad_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, (pr, rs) in enumerate(zip(prompts, responses)):
        ids[i, p - len(pr):p] = torch.tensor(pr, dtype=torch.long)
        ids[i, p:p + len(rs)] = torch.tensor(rs, dtype=torch.long)
        att[i, p - len(pr):p + len(rs)] = 1
    mask = att[:, p:].float()
    return Collated(ids.to(device), att.to(device), ids[:, p:].to(device), mask.to(device), p)


def pad_rows(rows: Sequence[torch.Tensor], length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """1-D per-row tensors right-padded with 0 into (B, length)."""
    out = torch.zeros(len(rows), length, dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out.to(device)


# ---------------------------------------------------------------------------------------------
# Sampling


def eos_ids(tokenizer, lm: nn.Module) -> list[int]:
    """Every token that ends a response: the tokenizer's end of sequence and the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, list) else [gen])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(lm: nn.Module, prompts: Sequence[Sequence[int]], *, pad_id: int, eos: list[int], max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, greedy: bool = False, device: torch.device | str = "cpu"
             ) -> tuple[list[list[int]], list[bool]]:
    """Sample one response per prompt: (response ids up to and including the first end token, whether
    each ended on its own rather than at `max_new_tokens`)."""
    p = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), p), pad_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, pr in enumerate(prompts):
        ids[i, p - len(pr):] = torch.tensor(pr, dtype=torch.long)
        att[i, p - len(pr):] = 1
    was_training = lm.training
    lm.eval()
    kwargs = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature,
                                                  "top_k": top_k or None, "top_p": None}
    out = lm.generate(input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new_tokens,
                      pad_token_id=pad_id, eos_token_id=eos, min_new_tokens=1, **kwargs)
    lm.train(was_training)
    responses, ended = [], []
    for row in out[:, p:].tolist():
        cut = next((j for j, t in enumerate(row) if t in eos), None)
        responses.append(row[:cut + 1] if cut is not None else row)
        ended.append(cut is not None)
    return responses, ended


# ---------------------------------------------------------------------------------------------
# Remote scoring


class ScoreError(RuntimeError):
    """The reward server answered, but not with one finite score per pair (or refused the input)."""


class RewardServiceDown(RuntimeError):
    """The reward server stayed unreachable for longer than the configured patience."""

    def __init__(self, target: str, waited: float, last: BaseException):
        super().__init__(f"the reward server at {target} did not answer for {waited:.0f} s "
                         f"(reward.patience_s); last error: {last}")
        self.target, self.waited = target, waited


RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.CANCELLED)
"""Codes that mean "not now" (the server is down, restarting, draining or overloaded): retried until patience
runs out."""


def check_scores(scores: Sequence[float], *, expected: int, target: str) -> list[float]:
    """`scores` if there is one finite float per pair; otherwise ScoreError naming the server."""
    scores = list(scores)
    if len(scores) != expected:
        raise ScoreError(f"the reward server at {target} returned {len(scores)} scores for {expected} pairs")
    bad = [i for i, s in enumerate(scores) if not isinstance(s, (int, float)) or not math.isfinite(s)]
    if bad:
        raise ScoreError(f"the reward server at {target} returned non-finite scores for pairs {bad[:8]} "
                         f"(e.g. {scores[bad[0]]!r}); refusing to train on them")
    return [float(s) for s in scores]


@dataclass
class ScoreResult:
    scores: list[float]
    seconds: float  # wall time of the call(s), retries included
    retried: int = 0  # failed calls retried after the client's own retries ran out


@dataclass
class RemoteScorer:
    """Scores (prompt, response) pairs on the remote reward service; `submit` runs a call on a
    background thread (one at a time, in order) and returns a future."""

    cfg: RewardConfig
    client: RewardClient = field(init=False)
    _pool: cf.ThreadPoolExecutor = field(init=False)

    def __post_init__(self):
        self.client = RewardClient(self.cfg.address, token=self.cfg.token or None, timeout=self.cfg.timeout_s)
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="grm-ppo-score")

    @property
    def target(self) -> str:
        return self.client.target

    def wait_ready(self) -> None:
        self.client.wait_ready(self.cfg.wait_ready_s)

    def score(self, pairs: list[tuple]) -> ScoreResult:
        """Scores of `pairs`; retries "not now" failures until `patience_s` has passed since the first."""
        t0 = time.monotonic()
        first_failure: float | None = None
        retried = 0
        while True:
            call_start = time.monotonic()
            timeout = self.cfg.timeout_s
            if first_failure is not None:  # while the server is away, no call outlives the patience
                timeout = max(1.0, min(timeout, self.cfg.patience_s - (call_start - first_failure)))
            try:
                scores = self.client.score(pairs, truncate=self.cfg.truncate, timeout=timeout)
                return ScoreResult(check_scores(scores, expected=len(pairs), target=self.target),
                                   time.monotonic() - t0, retried)
            except RewardServerError as exc:
                if exc.code not in RETRYABLE:
                    raise ScoreError(f"the reward server refused the rollouts: {exc}") from exc
                first_failure = call_start if first_failure is None else first_failure
                waited = time.monotonic() - first_failure
                if waited >= self.cfg.patience_s:
                    raise RewardServiceDown(self.target, waited, exc) from exc
                retried += 1
                log.warning("reward server at %s: %s; retrying (down for %.0f s of %.0f s patience)",
                            self.target, exc.code.name, waited, self.cfg.patience_s)
                time.sleep(min(1.0, self.cfg.patience_s - waited))

    def submit(self, pairs: list[tuple]) -> cf.Future:
        return self._pool.submit(self.score, pairs)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
