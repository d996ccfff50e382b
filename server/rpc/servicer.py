"""Thin servicer: proto ↔ domain objects, then await the engine. No status codes here: domain
errors propagate to the one interceptor that maps them (interceptors.py)."""

from __future__ import annotations

import asyncio
import importlib.metadata
import time
from concurrent.futures import ThreadPoolExecutor

from grmserve.protos import reward_pb2, reward_pb2_grpc
from grmserve.training.core.prompts import InputError

from ..config import LimitsConfig
from ..engine.base import Engine, ScoreJob, ScoreResult

SERVER_VERSION = importlib.metadata.version("grm-serve")
"""The installed package's version (pyproject.toml is its one source)."""


def prompt_from_proto(prompt: reward_pb2.Prompt, field: str):
    kind = prompt.WhichOneof("kind")
    if kind == "text":
        if not prompt.text:
            raise InputError(f"{field}.text", "is empty")
        return prompt.text
    if kind == "messages":
        return [{"role": m.role, "content": m.content} for m in prompt.messages.messages]
    raise InputError(field, "is missing: set prompt.text or prompt.messages")


def metadata_to_proto(result: ScoreResult, request_id: str) -> reward_pb2.CallMetadata:
    return reward_pb2.CallMetadata(request_id=request_id, sequence_tokens=result.sequence_tokens,
                                   truncated=result.truncated, computed_tokens=result.computed_tokens,
                                   queue_seconds=result.queue_seconds, compute_seconds=result.compute_seconds)


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    """RewardService over an `Engine`. Tokenization runs on a small thread pool, off the event loop."""

    def __init__(self, engine: Engine, limits: LimitsConfig, max_tokens: int):
        self.engine = engine
        self.limits = limits
        self.max_tokens = max_tokens
        self._tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grm-tokenize")

    async def _encode(self, fn):
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn)

    async def Score(self, request: reward_pb2.ScoreRequest, context) -> reward_pb2.ScoreResponse:
        n = len(request.pairs)
        if n == 0:
            raise InputError("pairs", "is empty: send at least one (prompt, response) pair")
        if n > self.limits.max_pairs_per_request:
            raise InputError("pairs", f"has {n} pairs, over the limit of {self.limits.max_pairs_per_request}; "
                                      "split the request")
        prompts = [prompt_from_proto(p.prompt, f"pairs[{i}].prompt") for i, p in enumerate(request.pairs)]
        renderer = self.engine.renderer()

        def encode():
            return [renderer.encode(prompts[i], [p.response], max_tokens=self.max_tokens, truncate=request.truncate,
                                    field=f"pairs[{i}].prompt", response_fields=[f"pairs[{i}].response"])
                    for i, p in enumerate(request.pairs)]

        groups = await self._encode(encode)
        result = await self.engine.submit(ScoreJob(groups=groups, deadline=_deadline(context),
                                                   request_id=request.request_id))
        return reward_pb2.ScoreResponse(scores=result.scores, metadata=metadata_to_proto(result, request.request_id))

    async def ScoreCandidates(self, request: reward_pb2.ScoreCandidatesRequest,
                              context) -> reward_pb2.ScoreCandidatesResponse:
        n = len(request.responses)
        if n == 0:
            raise InputError("responses", "is empty: send at least one candidate response")
        if n > self.limits.max_candidates:
            raise InputError("responses", f"has {n} candidates, over the limit of {self.limits.max_candidates}")
        prompt = prompt_from_proto(request.prompt, "prompt")
        renderer = self.engine.renderer()
        responses = list(request.responses)
        group = await self._encode(lambda: renderer.encode(prompt, responses, max_tokens=self.max_tokens,
                                                           truncate=request.truncate))
        result = await self.engine.submit(ScoreJob(groups=[group], shared_prompt=True, deadline=_deadline(context),
                                                   request_id=request.request_id))
        best = max(range(n), key=lambda i: (result.scores[i], -i))
        return reward_pb2.ScoreCandidatesResponse(scores=result.scores, best_index=best,
                                                  metadata=metadata_to_proto(result, request.request_id))

    async def Info(self, request: reward_pb2.InfoRequest, context) -> reward_pb2.InfoResponse:
        i = self.engine.info
        return reward_pb2.InfoResponse(
            model_name=i.model_name, model_version=i.model_version, precision=i.precision, max_tokens=self.max_tokens,
            max_pairs_per_request=self.limits.max_pairs_per_request, max_candidates=self.limits.max_candidates,
            head_type=i.head_type, checkpoint_format=i.checkpoint_format, chat_template=i.chat_template,
            server_version=SERVER_VERSION, device=i.device, max_message_bytes=self.limits.max_message_mb << 20)
