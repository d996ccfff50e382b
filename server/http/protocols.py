"""The HTTP door's two JSON protocols ↔ domain objects. Pure functions: no aiohttp, no engine.

**OpenRLHF** `POST /get_reward` (openrlhf/cli/serve_rm.py; client: openrlhf/utils/agent.py)::

    {"query": [full text, ...], "prompts": [prompt text, ...], "labels": [...]}
    → {"rewards": [r, ...], "scores": [r, ...], "extra_logs": {"sequence_tokens": [n, ...]}}

`query[i]` is the whole sample, prompt and response, as OpenRLHF decodes it. When `prompts[i]` is a
non-empty prefix of it, the sample is scored as that verbatim text prompt plus the rest as the
response (the same sequence, and score, as gRPC `Score` with `prompt.text = prompts[i]`; the
prompt's KV state is shared by its samples); otherwise the whole query is one verbatim text.
`labels` are accepted and ignored (a reward model does not read them). An extra `"truncate": true`
truncates too-long samples instead of answering 400.

**vLLM pooling API** `POST /classify`, as verl's reward loop sends it
(verl/experimental/reward_loop/reward_loop.py; protocol: vllm/entrypoints/pooling/classify/)::

    {"model": "...", "input": "text" | ["text", ...], "use_activation": false}
    → {"id": "classify-…", "object": "list", "created": 1760000000, "model": "...",
       "data": [{"index": 0, "label": null, "probs": [r], "num_classes": 1}, ...],
       "usage": {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0, "prompt_tokens_details": null}}

Honoured: `input` (a string or a list of strings, each a whole verbatim text), or instead `messages`
(a chat ending with the assistant's message, rendered with the model's chat template, as gRPC
Score renders chat prompts); `use_activation` (and its older names `activation`, `softmax`):
false gives the raw reward, true or absent gives sigmoid(reward), as vLLM does for one class;
`truncate_prompt_tokens` (-1: the model's limit, k: keep the last k tokens); `model` (echoed; any
name is accepted); `request_id`; `add_special_tokens` (default true, as in vLLM): a chat-rendered
text whose leading BOS token was stripped gets it back (verl strips the BOS, expecting vLLM to add
it; SmolLM2's BOS is `<|im_start|>`, the template's first token), and nothing else is ever added.
Ignored: `user`, `priority`. Token-id input is refused (400).

Whole texts drop trailing whitespace, so that the reward is read at the last real token, where
training reads it (a chat rendered as `…<|im_end|>\\n` scores like the same chat sent as messages).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from grmserve.training.core.prompts import ROLES, EncodedGroup, InputError, Prompt, PromptRenderer

from ..engine.base import ScoreResult


@dataclass
class Sample:
    """One sequence to score, named by its field in the request: a whole verbatim `text`, or a
    `prompt` (verbatim text or chat messages) and its `response`."""

    field: str
    text: str | None = None
    prompt: Prompt | None = None
    response: str = ""

    def encode(self, renderer: PromptRenderer, max_tokens: int, truncate: bool) -> EncodedGroup:
        if self.text is not None:
            return renderer.encode_text(self.text, max_tokens=max_tokens, truncate=truncate, field=self.field)
        return renderer.encode(self.prompt, [self.response], max_tokens=max_tokens, truncate=truncate,
                               field=self.field, response_fields=[self.field])


@dataclass
class ScoreBatch:
    """What a request asks the engine: samples, truncation (`max_tokens` None: the model's limit)."""

    samples: list[Sample]
    truncate: bool = False
    max_tokens: int | None = None
    request_id: str = ""


def _texts(body: dict, name: str, limit: int) -> list[str]:
    value = body.get(name)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise InputError(name, "is missing or empty: send a list of strings")
    if len(value) > limit:
        raise InputError(name, f"has {len(value)} items, over the limit of {limit}; split the request")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise InputError(f"{name}[{i}]", "must be a string (token ids are not accepted)")
    return value


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise InputError("body", "must be a JSON object")
    return body


# -- OpenRLHF /get_reward ---------------------------------------------------------------------------


def query_sample(query: str, prompt: Any, field: str) -> Sample:
    """A query split at its prompt when the prompt is a non-empty prefix of it; else the whole text.

    >>> query_sample("<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>",
    ...              "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n", "query[0]").response
    'Hello<|im_end|>'
    >>> query_sample("Q: 2+2? A: 4\\n", None, "query[0]").text
    'Q: 2+2? A: 4'
    """
    if isinstance(prompt, str) and prompt and query.startswith(prompt) and query[len(prompt):].strip():
        return Sample(field=field, prompt=prompt, response=query[len(prompt):].rstrip())
    return Sample(field=field, text=query.rstrip())


def parse_get_reward(body: Any, max_items: int) -> ScoreBatch:
    body = _object(body)
    queries = _texts(body, "query", max_items)
    prompts = body.get("prompts")
    if prompts is not None and (not isinstance(prompts, list) or len(prompts) != len(queries)):
        raise InputError("prompts", f"must be a list as long as query ({len(queries)} items)")
    prompts = prompts or [None] * len(queries)
    return ScoreBatch([query_sample(q, p, f"query[{i}]") for i, (q, p) in enumerate(zip(queries, prompts))],
                      truncate=bool(body.get("truncate", False)))


def get_reward_response(result: ScoreResult) -> dict:
    return {"rewards": result.scores, "scores": result.scores,
            "extra_logs": {"sequence_tokens": result.sequence_tokens}}


# -- vLLM /classify ---------------------------------------------------------------------------------


def _chat(body: dict) -> Sample:
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise InputError("messages", "must be a non-empty list of {role, content} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InputError(f"messages[{i}]", f"must be {{role, content}}, role one of {list(ROLES)}, content text")
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise InputError("messages", "must end with the assistant's message (the response to score)")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    return Sample(field="messages[-1].content", prompt=prompt, response=messages[-1]["content"])


def _activation(body: dict) -> bool:
    for name in ("use_activation", "activation", "softmax"):
        value = body.get(name)
        if value is not None:
            if not isinstance(value, bool):
                raise InputError(name, "must be true, false or null")
            return value
    return True  # vLLM's default


def _truncation(body: dict, max_tokens: int) -> tuple[bool, int | None]:
    k = body.get("truncate_prompt_tokens")
    if k is None:
        return False, None
    if not isinstance(k, int) or isinstance(k, bool) or k == 0 or k < -1:
        raise InputError("truncate_prompt_tokens", "must be -1 (the model's limit) or a positive token count")
    return True, max_tokens if k == -1 else min(k, max_tokens)


def restore_bos(text: str, bos: str | None, chat_head: str) -> str:
    r"""`text` with the BOS token put back when it is a chat render that lost it (the text plus BOS
    starts like every render of the chat template); otherwise `text` as it is.

    >>> restore_bos("system\nBe brief.<|im_end|>", "<|im_start|>", "<|im_start|>system\nBe brief.")
    '<|im_start|>system\nBe brief.<|im_end|>'
    >>> restore_bos("Q: 2+2? A: 4", "<|im_start|>", "<|im_start|>system\nBe brief.")
    'Q: 2+2? A: 4'
    """
    if (bos and len(chat_head) > len(bos) and chat_head.startswith(bos) and not text.startswith(bos)
            and (bos + text).startswith(chat_head)):
        return bos + text
    return text


def parse_classify(body: Any, max_items: int, max_tokens: int, bos: str | None = None,
                   chat_head: str = "") -> tuple[ScoreBatch, bool, str | None]:
    """(what to score, whether to apply the sigmoid, the model name asked for). `bos` and
    `chat_head` (the text every chat render starts with) serve `add_special_tokens`."""
    body = _object(body)
    if ("input" in body) == ("messages" in body):
        raise InputError("input", "send either input (text or a list of texts) or messages")
    if "messages" in body:
        samples = [_chat(body)]
    else:
        texts = _texts(body, "input", max_items)
        if body.get("add_special_tokens", True) is not False:
            texts = [restore_bos(t, bos, chat_head) for t in texts]
        samples = [Sample(field=f"input[{i}]", text=t.rstrip()) for i, t in enumerate(texts)]
    truncate, limit = _truncation(body, max_tokens)
    request_id = body.get("request_id") if isinstance(body.get("request_id"), str) else ""
    model = body.get("model") if isinstance(body.get("model"), str) else None
    return ScoreBatch(samples, truncate=truncate, max_tokens=limit, request_id=request_id), _activation(body), model


def sigmoid(x: float) -> float:
    """The logistic function, without overflow.

    >>> sigmoid(0.0), round(sigmoid(-800.0), 3)
    (0.5, 0.0)
    """
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def classify_response(result: ScoreResult, activation: bool, model: str) -> dict:
    values = [sigmoid(s) if activation else s for s in result.scores]
    tokens = sum(result.sequence_tokens)
    return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
            "data": [{"index": i, "label": None, "probs": [v], "num_classes": 1} for i, v in enumerate(values)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None}}
