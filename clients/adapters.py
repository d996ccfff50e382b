"""Reward functions for RL frameworks, backed by the reward server through `RewardClient`: batched
(one Score call per batch, split to the server's limits), retried, and a failed call raises
`RewardServerError` (never a silent `None`, which the trainers would turn into NaN).

**TRL** (`GRPOTrainer`, `RLOOTrainer`): `reward_funcs` callables `(prompts, completions, **kwargs)
-> list[float]`. Conversational samples (lists of `{"role", "content"}` messages) are sent as chat
messages, which the server renders with the reward model's chat template; plain strings are sent
verbatim, prompt + completion, as TRL's own reward-model path scores them.

    >>> from trl import GRPOConfig, GRPOTrainer                                   # doctest: +SKIP
    >>> trainer = GRPOTrainer(model="my-policy", reward_funcs=[TRLReward("rm-host:50051")],
    ...                       args=GRPOConfig(...), train_dataset=prompts)        # doctest: +SKIP

`AsyncTRLReward` is the same as a coroutine (TRL runs async reward functions concurrently).

**verl**: its custom reward function `compute_score(data_source, solution_str, ground_truth,
extra_info=None)`, one sample per call (verl calls it from many threads at once; the server batches
them). The prompt comes from the sample's `extra_info` (`"prompt"`, else `"question"`, the key verl's
example preprocessors write): a list of messages, or a string taken as the user's message. The
server's address and the other client settings come from verl's `reward_kwargs`:

    custom_reward_function.path=$(python -c 'import grmserve.clients.adapters as a; print(a.__file__)')
    custom_reward_function.name=compute_score
    +custom_reward_function.reward_kwargs.target=rm-host:50051
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Sequence

from grmserve.clients.reward_client import AsyncRewardClient, Prompt, RewardClient

DEFAULT_TARGET = "localhost:50051"
PROMPT_KEYS = ("prompt", "question")


def _text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a multimodal content list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def _messages(messages: Sequence[dict]) -> list[dict]:
    return [{"role": m["role"], "content": _text(m.get("content"))} for m in messages]


def trl_pair(prompt: str | Sequence[dict], completion: str | Sequence[dict], index: int = 0) -> tuple[Prompt, str]:
    """One TRL sample as a (prompt, response) pair. A conversational completion's last message is the
    response; messages before it (tool calls and results) join the prompt.

    >>> trl_pair("Q: 2+2? A:", " 4")
    ('Q: 2+2? A:', ' 4')
    >>> trl_pair([{"role": "user", "content": "2+2?"}], [{"role": "assistant", "content": "4"}])
    ([{'role': 'user', 'content': '2+2?'}], '4')
    """
    if isinstance(completion, str):
        return (prompt if isinstance(prompt, str) else _messages(prompt)), completion
    if not completion or completion[-1].get("role") != "assistant":
        raise ValueError(f"completions[{index}]: expected messages ending with the assistant's, got {completion!r}")
    response = _text(completion[-1].get("content"))
    if not isinstance(prompt, str):
        return _messages(prompt) + _messages(completion[:-1]), response
    if len(completion) > 1:
        raise ValueError(f"completions[{index}]: a text prompt cannot continue with several messages")
    return prompt, response


def trl_pairs(prompts: Sequence, completions: Sequence) -> list[tuple[Prompt, str]]:
    """TRL's `prompts` and `completions` as (prompt, response) pairs, in order."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [trl_pair(p, c, i) for i, (p, c) in enumerate(zip(prompts, completions))]


class _Lazy:
    """Holds client settings and opens the client on first use (so the adapter pickles, for TRL's
    and verl's worker processes, and an asyncio client opens in the loop that uses it)."""

    def __init__(self, target: str, name: str, client_kwargs: dict):
        self.target = target
        self.__name__ = name  # TRL names the reward's log column after it
        self._kwargs = client_kwargs
        self._client = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {**self.__dict__, "_client": None, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def client(self) -> RewardClient:
        """The blocking client (opened on first use, shared by threads)."""
        with self._lock:
            if self._client is None:
                self._client = RewardClient(self.target, **self._kwargs)
            return self._client


class TRLReward(_Lazy):
    """A TRL reward function scored by the reward server at `target`; `client_kwargs` go to
    `RewardClient` (token, root_certificates, timeout, retry, ...)."""

    def __init__(self, target: str = DEFAULT_TARGET, *, name: str = "grm_reward", **client_kwargs):
        super().__init__(target, name, client_kwargs)

    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
        return self.client.score(trl_pairs(prompts, completions))


class AsyncTRLReward(_Lazy):
    """`TRLReward` as a coroutine function, on an `AsyncRewardClient` opened in the calling loop."""

    def __init__(self, target: str = DEFAULT_TARGET, *, name: str = "grm_reward_async", **client_kwargs):
        super().__init__(target, name, client_kwargs)
        self._loop = None

    def __getstate__(self):
        return {**super().__getstate__(), "_loop": None}

    async def __call__(self, prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a grpc.aio channel belongs to one event loop
            self._client, self._loop = AsyncRewardClient(self.target, **self._kwargs), loop
        return await self._client.score(trl_pairs(prompts, completions))


def prompt_from_extra_info(extra_info: dict | None, keys: Sequence[str] = PROMPT_KEYS) -> Prompt:
    """The prompt of a verl sample: the first of `keys` in `extra_info`; messages as they are, a
    string as the user's message.

    >>> prompt_from_extra_info({"question": "2+2?", "index": 3})
    [{'role': 'user', 'content': '2+2?'}]
    """
    for key in keys:
        value = (extra_info or {}).get(key)
        if isinstance(value, str) and value:
            return [{"role": "user", "content": value}]
        if isinstance(value, (list, tuple)) and value:
            return _messages(value)
    raise ValueError(f"extra_info has none of {list(keys)}: the reward model needs the prompt; add it to each "
                     "sample's extra_info when preprocessing the dataset")


class VerlReward(_Lazy):
    """verl's custom reward function, one sample per call: the raw reward of `solution_str` as the
    answer to the prompt in `extra_info`. `ground_truth` and `data_source` are not used."""

    def __init__(self, target: str = DEFAULT_TARGET, *, prompt_keys: Sequence[str] = PROMPT_KEYS, **client_kwargs):
        super().__init__(target, "grm_reward", client_kwargs)
        self.prompt_keys = tuple(prompt_keys)

    def __call__(self, data_source: str, solution_str: str, ground_truth: Any = None, extra_info: dict | None = None,
                 **verl_kwargs) -> float:
        prompt = prompt_from_extra_info(extra_info, self.prompt_keys)
        return self.client.score([(prompt, solution_str)])[0]


_VERL: dict[tuple, VerlReward] = {}
_VERL_LOCK = threading.Lock()


def compute_score(data_source: str, solution_str: str, ground_truth: Any = None, extra_info: dict | None = None, *,
                  target: str = DEFAULT_TARGET, token: str | None = None, root_certificates: str | None = None,
                  timeout: float = 60.0, **verl_kwargs) -> float:
    """verl's `custom_reward_function` (sync): `target`, `token`, `root_certificates` (a PEM path) and
    `timeout` come from `custom_reward_function.reward_kwargs`; one client per setting, shared by
    verl's threads. Other keyword arguments verl passes (reward_router_address, ...) are ignored.

    >>> compute_score("gsm8k", "4", "4", {"question": "2+2?"}, target="rm-host:50051")  # doctest: +SKIP
    1.73
    """
    key = (target, token, root_certificates, timeout)
    with _VERL_LOCK:
        reward = _VERL.get(key)
        if reward is None:
            reward = _VERL[key] = VerlReward(target, token=token, root_certificates=root_certificates, timeout=timeout)
    return reward(data_source, solution_str, ground_truth, extra_info)
