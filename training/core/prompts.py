"""Turning (prompt, response) into token ids: the one place training and serving both use.

The token sequence of a pair is `prompt_ids + response_ids`, each tokenized separately with no
added special tokens, so that (a) the prompt is an exact prefix of every response's sequence (the
server encodes a shared prompt once and reuses its KV cache), and (b) the prompt tokens are known
for masking the regulariser's log-probs. Neither side ever adds a second BOS or applies the chat
template twice.

Prompts are either plain text (used verbatim) or chat messages, rendered with the tokenizer's chat
template with an assistant turn opened. With chat messages the response is closed the way the
template closes an assistant turn (for SmolLM2 `...<|im_end|>`), trailing whitespace removed, so
the reward is read at the end-of-turn token.

Truncation policy (when asked; otherwise too-long input is an error): drop prompt tokens from the
left until prompt + response fits; if the response alone is too long keep its last tokens.

    >>> from grmserve.training.core.prompts import truncate_pair
    >>> truncate_pair([1, 2, 3, 4], [5, 6], max_tokens=4)
    ([3, 4], [5, 6], True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

ROLES = ("system", "user", "assistant", "tool")
_SENTINEL = "\x00GRM_RESPONSE\x00"

Prompt = str | Sequence[dict]


class InputError(ValueError):
    """Bad input, with the field it concerns (e.g. `pairs[3].prompt.messages[1].role`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def truncate_pair(prompt_ids: list[int], response_ids: list[int], max_tokens: int) -> tuple[list[int], list[int], bool]:
    """Apply the truncation policy: left-truncate the prompt, then keep the response's tail."""
    if len(prompt_ids) + len(response_ids) <= max_tokens:
        return prompt_ids, response_ids, False
    if len(response_ids) >= max_tokens:
        return [], response_ids[len(response_ids) - max_tokens:], True
    keep = max_tokens - len(response_ids)
    return prompt_ids[len(prompt_ids) - keep:], response_ids, True


@dataclass
class EncodedGroup:
    """One prompt and its responses, as token ids."""

    prompt_ids: list[int]
    response_ids: list[list[int]]
    truncated: list[bool]

    def sequence_lengths(self) -> list[int]:
        return [len(self.prompt_ids) + len(r) for r in self.response_ids]


class PromptRenderer:
    """Renders and tokenizes prompts and responses for one tokenizer.

    >>> from transformers import AutoTokenizer                      # doctest: +SKIP
    >>> r = PromptRenderer(AutoTokenizer.from_pretrained(path))     # doctest: +SKIP
    >>> g = r.encode([{"role": "user", "content": "Hi"}], ["Hello!"], max_tokens=512)  # doctest: +SKIP
    """

    def __init__(self, tokenizer, *, use_chat_template: bool = True):
        self.tokenizer = tokenizer
        self.use_chat_template = bool(use_chat_template and getattr(tokenizer, "chat_template", None))

    # -- text ---------------------------------------------------------------------------------
    def validate_messages(self, messages: Sequence[dict], field: str) -> list[dict]:
        if not self.use_chat_template:
            raise InputError(field, "this model has no chat template; send the prompt as plain text")
        if not messages:
            raise InputError(field, "must contain at least one message")
        out = []
        for i, m in enumerate(messages):
            role, content = m.get("role", ""), m.get("content", "")
            if role not in ROLES:
                raise InputError(f"{field}[{i}].role", f"unknown chat role {role!r}; expected one of {list(ROLES)}")
            if not isinstance(content, str):
                raise InputError(f"{field}[{i}].content", "must be a string")
            out.append({"role": role, "content": content})
        return out

    def render_prompt(self, prompt: Prompt, field: str = "prompt") -> str:
        if isinstance(prompt, str):
            if not prompt:
                raise InputError(field, "is empty")
            return prompt
        return self._render_messages(self.validate_messages(prompt, f"{field}.messages"))

    def _render_messages(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _closing(self, messages: list[dict], prompt_text: str) -> tuple[str, str]:
        """(text before, text after) the assistant content when the template closes its turn."""
        full = self.tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": _SENTINEL}], tokenize=False, add_generation_prompt=False
        )
        if not full.startswith(prompt_text) or _SENTINEL not in full:
            # Templates that rewrite earlier turns: fall back to the response as given.
            return "", ""
        before, after = full[len(prompt_text):].split(_SENTINEL, 1)
        return before, after.rstrip()

    # -- ids ----------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode(self, prompt: Prompt, responses: Sequence[str], *, max_tokens: int, truncate: bool = False,
               field: str = "prompt", response_field: str = "responses",
               response_fields: Sequence[str] | None = None) -> EncodedGroup:
        """Token ids for one prompt and its responses, with the truncation policy applied.

        A shared prompt is truncated once so that it fits beside the longest response; a response
        that alone exceeds `max_tokens` keeps its tail. Errors name `field` (the prompt) and
        `response_fields[i]` (default `{response_field}[i]`).
        """
        names = (list(response_fields) if response_fields is not None
                 else [f"{response_field}[{i}]" for i in range(len(responses))])
        if isinstance(prompt, str):
            prompt_text, texts = self.render_prompt(prompt, field), list(responses)
        else:
            messages = self.validate_messages(prompt, f"{field}.messages")
            prompt_text = self._render_messages(messages)
            before, after = self._closing(messages, prompt_text)
            texts = [before + r + after for r in responses]
        for i, r in enumerate(responses):
            if not r:
                raise InputError(names[i], "is empty")
        ids = self.tokenize([prompt_text, *texts])
        prompt_ids, response_ids = ids[0], ids[1:]
        longest = max((len(r) for r in response_ids), default=0)
        truncated = [False] * len(response_ids)
        if len(prompt_ids) + longest > max_tokens:
            if not truncate:
                worst = max(range(len(response_ids)), key=lambda i: len(response_ids[i]))
                raise InputError(
                    names[worst],
                    f"prompt + response is {len(prompt_ids) + longest} tokens, over the limit of {max_tokens}; "
                    "shorten it or set truncate=true",
                )
            keep = max(0, max_tokens - longest)
            if keep < len(prompt_ids):
                prompt_ids = prompt_ids[len(prompt_ids) - keep:] if keep else []
                truncated = [True] * len(response_ids)
            for i, r in enumerate(response_ids):
                if len(prompt_ids) + len(r) > max_tokens:
                    response_ids[i] = r[len(r) - (max_tokens - len(prompt_ids)):]
                    truncated[i] = True
        return EncodedGroup(prompt_ids=prompt_ids, response_ids=response_ids, truncated=truncated)

    def encode_text(self, text: str, *, max_tokens: int, truncate: bool = False, field: str = "text") -> EncodedGroup:
        """One whole, already-rendered text (prompt and response together, as vLLM's /classify and
        OpenRLHF's /get_reward receive them) as a single sequence: tokenized verbatim in one piece,
        no template, no special tokens added; its last token stands as the "response", so that the
        prefix cache can reuse the rest. Too long: InputError, or with `truncate` its last tokens."""
        if not text:
            raise InputError(field, "is empty")
        ids = self.tokenize([text])[0]
        if not ids:
            raise InputError(field, "has no tokens")
        truncated = len(ids) > max_tokens
        if truncated and not truncate:
            raise InputError(field, f"is {len(ids)} tokens, over the limit of {max_tokens}; shorten it or truncate")
        ids = ids[len(ids) - max_tokens:] if truncated else ids
        return EncodedGroup(prompt_ids=ids[:-1], response_ids=[ids[-1:]], truncated=[truncated])
