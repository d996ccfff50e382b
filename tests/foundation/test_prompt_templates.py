"""PromptRenderer with SmolLM2's tokenizer: prompt ids are a prefix, chat responses close with
<|im_end|>, no special token is added twice, plain text is verbatim, truncation follows the policy."""

from __future__ import annotations

import pytest

from grmserve.training.core.prompts import InputError, PromptRenderer, truncate_pair

IM_START, IM_END = 1, 2
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
]
RESPONSES = ["4", "The answer is four.", "Four.  \n"]


@pytest.fixture(scope="module")
def bos_adding_tokenizer(tokenizer_path):
    """A copy of the tokenizer whose `add_special_tokens=True` prepends <|im_start|> (the way
    Llama-style tokenizers prepend BOS), so that an added special token would show."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A",
                                                              special_tokens=[("<|im_start|>", 1)])
    assert tok("hi")["input_ids"][0] == IM_START  # the trap is armed
    return tok


def test_chat_prompt_is_a_prefix_of_the_whole_conversation(tokenizer):
    renderer = PromptRenderer(tokenizer)
    group = renderer.encode(CHAT, RESPONSES[:2], max_tokens=512)
    for response, response_ids in zip(RESPONSES[:2], group.response_ids):
        full_text = tokenizer.apply_chat_template(CHAT + [{"role": "assistant", "content": response}], tokenize=False)
        full_ids = tokenizer(full_text.rstrip(), add_special_tokens=False)["input_ids"]
        assert full_ids[: len(group.prompt_ids)] == group.prompt_ids
        assert full_ids == group.prompt_ids + response_ids


def test_chat_prompt_opens_the_assistant_turn_and_responses_close_it(tokenizer):
    renderer = PromptRenderer(tokenizer)
    group = renderer.encode(CHAT, RESPONSES, max_tokens=512)
    assistant_open = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert group.prompt_ids[-len(assistant_open):] == assistant_open
    for ids in group.response_ids:
        assert ids[-1] == IM_END
        assert ids.count(IM_END) == 1
    assert tokenizer.decode(group.response_ids[0]) == "4<|im_end|>"
    assert group.truncated == [False] * len(RESPONSES)
    assert group.sequence_lengths() == [len(group.prompt_ids) + len(r) for r in group.response_ids]


@pytest.mark.parametrize("which", ["fixture", "bos_adding"])
def test_no_special_token_is_added_twice(tokenizer, bos_adding_tokenizer, which):
    tok = tokenizer if which == "fixture" else bos_adding_tokenizer
    renderer = PromptRenderer(tok)
    group = renderer.encode(CHAT, RESPONSES, max_tokens=512)
    rendered = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    # <|im_start|> appears exactly where the template writes it: system, user, assistant.
    assert rendered.count("<|im_start|>") == 3
    assert group.prompt_ids.count(IM_START) == 3
    assert group.prompt_ids[0] == IM_START and group.prompt_ids[1] != IM_START
    for ids in group.response_ids:
        assert IM_START not in ids

    plain = renderer.encode("Question: 2 + 2?\nAnswer:", [" 4"], max_tokens=512)
    assert IM_START not in plain.prompt_ids and IM_START not in plain.response_ids[0]


def test_plain_text_prompts_are_tokenized_verbatim(tokenizer):
    renderer = PromptRenderer(tokenizer)
    prompt, response = "Question: 2 + 2?\nAnswer:", " 4, of course. "
    group = renderer.encode(prompt, [response], max_tokens=512)
    assert group.prompt_ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert group.response_ids == [tokenizer(response, add_special_tokens=False)["input_ids"]]
    assert tokenizer.decode(group.prompt_ids) == prompt
    assert tokenizer.decode(group.response_ids[0]) == response  # no template, no <|im_end|>, whitespace kept


def test_plain_text_may_carry_its_own_rendered_template(tokenizer):
    """An already-rendered chat prompt sent as text is used as is, not wrapped a second time."""
    renderer = PromptRenderer(tokenizer)
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    as_text = renderer.encode(rendered, ["4<|im_end|>"], max_tokens=512)
    as_chat = renderer.encode(CHAT, ["4"], max_tokens=512)
    assert as_text.prompt_ids == as_chat.prompt_ids
    assert as_text.response_ids == as_chat.response_ids


def test_unknown_role_names_the_field(tokenizer):
    renderer = PromptRenderer(tokenizer)
    bad = [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]
    with pytest.raises(InputError) as info:
        renderer.encode(bad, ["x"], max_tokens=512)
    assert info.value.field == "prompt.messages[1].role"
    assert "robot" in str(info.value) and str(info.value).startswith("prompt.messages[1].role: ")


@pytest.mark.parametrize(
    "prompt, responses, field",
    [
        ("", ["x"], "prompt"),
        ("hi", ["x", ""], "responses[1]"),
        ([], ["x"], "prompt.messages"),
        ([{"role": "user", "content": 3}], ["x"], "prompt.messages[0].content"),
    ],
)
def test_other_bad_input_names_the_field(tokenizer, prompt, responses, field):
    with pytest.raises(InputError) as info:
        PromptRenderer(tokenizer).encode(prompt, responses, max_tokens=512)
    assert info.value.field == field


def test_chat_messages_refused_without_a_chat_template(tokenizer):
    renderer = PromptRenderer(tokenizer, use_chat_template=False)
    with pytest.raises(InputError, match="no chat template"):
        renderer.encode(CHAT, ["4"], max_tokens=512)


def test_too_long_input_is_an_error_unless_truncating(tokenizer):
    renderer = PromptRenderer(tokenizer)
    full = renderer.encode(CHAT, ["short", "a somewhat longer answer than the other one"], max_tokens=512)
    limit = len(full.prompt_ids) + max(map(len, full.response_ids)) - 1
    with pytest.raises(InputError) as info:
        renderer.encode(CHAT, ["short", "a somewhat longer answer than the other one"], max_tokens=limit)
    assert info.value.field == "responses[1]"
    assert f"limit of {limit}" in str(info.value)
    # Exactly at the limit is fine.
    ok = renderer.encode(CHAT, ["short", "a somewhat longer answer than the other one"], max_tokens=limit + 1)
    assert ok.truncated == [False, False]


def test_truncation_drops_prompt_tokens_from_the_left(tokenizer):
    renderer = PromptRenderer(tokenizer)
    responses = ["short", "a somewhat longer answer than the other one"]
    full = renderer.encode(CHAT, responses, max_tokens=512)
    longest = max(map(len, full.response_ids))
    keep = 5
    cut = renderer.encode(CHAT, responses, max_tokens=longest + keep, truncate=True)
    assert cut.prompt_ids == full.prompt_ids[-keep:]  # the shared prompt, cut once, from the left
    assert cut.response_ids == full.response_ids  # responses untouched
    assert cut.truncated == [True, True]
    assert max(cut.sequence_lengths()) == longest + keep


def test_truncation_keeps_the_tail_of_a_too_long_response(tokenizer):
    renderer = PromptRenderer(tokenizer)
    long_response = " ".join(f"word{i}" for i in range(80))
    full = renderer.encode(CHAT, [long_response, "ok"], max_tokens=4096)
    limit = 20
    cut = renderer.encode(CHAT, [long_response, "ok"], max_tokens=limit, truncate=True)
    assert cut.prompt_ids == []
    assert cut.response_ids[0] == full.response_ids[0][-limit:]
    assert cut.response_ids[0][-1] == IM_END  # the reward is still read at the end-of-turn token
    assert cut.response_ids[1] == full.response_ids[1]
    assert cut.truncated == [True, True]
    assert max(cut.sequence_lengths()) == limit


def test_truncate_pair_policy():
    assert truncate_pair([1, 2, 3], [4, 5], max_tokens=5) == ([1, 2, 3], [4, 5], False)
    assert truncate_pair([1, 2, 3], [4, 5], max_tokens=4) == ([2, 3], [4, 5], True)
    assert truncate_pair([1, 2, 3], [4, 5], max_tokens=2) == ([], [4, 5], True)
    assert truncate_pair([1, 2, 3], [4, 5, 6, 7], max_tokens=2) == ([], [6, 7], True)
