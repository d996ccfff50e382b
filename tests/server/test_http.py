"""The HTTP door (`--server.http_port`) over real loopback HTTP, on the same engine as gRPC: the
bodies OpenRLHF's and verl's clients send, one batch queue for both doors, errors → 400/401/429/503,
and the request metrics."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import math
import time
import urllib.error
import urllib.request

import aiohttp
import pytest

from grmserve.server.engine.base import DeadlineExpiredError, NotServingError, QueueFullError

from .conftest import ServerThread, tiny_config
from .test_reward_server import metric_value, scrape

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
RESPONSES = ["4", "Five, I think.", "It is four."]


def post(url: str, body, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def http_server(tiny_checkpoint):
    st = ServerThread(tiny_config(tiny_checkpoint, http_port=0)).start()
    yield st
    st.stop()


@pytest.fixture(scope="module")
def chat_scores(http_server):
    """What gRPC Score gives for CHAT + each response (chat messages, rendered by the server)."""
    with http_server.client() as c:
        return c.score([(CHAT, r) for r in RESPONSES])


def test_openrlhf_get_reward_body(http_server, chat_scores, tokenizer):
    """The request OpenRLHF's remote reward client sends, sent the way it sends it:
    openrlhf/utils/agent.py `SingleTurnAgentExecutor._fetch_rewards_via_http` posts
    `{"query": [query], "prompts": [prompt], "labels": [label]}` with aiohttp (one sample per request),
    `raise_for_status()`, and reads `rewards`, `scores` and `extra_logs` of the JSON answer; `query`
    is `hf_tokenizer.decode(prompt_ids + action_ids, skip_special_tokens=False)` and `prompt` the
    chat-templated prompt text. The shape answered is openrlhf/cli/serve_rm.py's."""
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(text=prompt, add_special_tokens=False)["input_ids"]

    async def fetch(query: str, with_prompt: bool) -> dict:
        payload = {"query": [query], "prompts": [prompt if with_prompt else None], "labels": ["4"]}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
            async with session.post(f"{http_server.http_url}/get_reward", json=payload) as response:
                response.raise_for_status()
                return await response.json()

    for response, want in zip(RESPONSES, chat_scores):
        action_ids = tokenizer(text=response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        query = tokenizer.decode(prompt_ids + action_ids, skip_special_tokens=False)
        split = asyncio.run(fetch(query, with_prompt=True))  # scored as text prompt + response
        whole = asyncio.run(fetch(query, with_prompt=False))  # scored as one verbatim text
        assert split["rewards"] == split["scores"] and len(split["rewards"]) == 1
        assert split["rewards"][0] == pytest.approx(want, abs=1e-5)
        assert whole["rewards"][0] == pytest.approx(want, abs=1e-5)
        assert split["extra_logs"]["sequence_tokens"] == [len(prompt_ids) + len(action_ids)]


def test_verl_classify_body(http_server, chat_scores, tokenizer):
    """The request verl's reward loop sends to a discriminative reward model on vLLM:
    verl/experimental/reward_loop/reward_loop.py `RewardLoopWorker.compute_score_disrm` posts
    `{"model", "input": rm_prompt, "use_activation": False}` to `/classify` with aiohttp (no timeout)
    and takes `output["data"][-1]["probs"][-1]`; `rm_prompt` is the whole chat rendered with
    `add_generation_prompt=False`, its leading BOS stripped (`_preprocess_reward_inputs`). The answer
    has vLLM's shape (vllm/entrypoints/pooling/classify/protocol.py `ClassificationResponse`)."""

    async def classify(payload: dict) -> dict:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            async with session.post(f"{http_server.http_url}/classify", json=payload) as response:
                response.raise_for_status()
                return await response.json()

    for response, want in zip(RESPONSES, chat_scores):
        rm_prompt = tokenizer.apply_chat_template(CHAT + [{"role": "assistant", "content": response}],
                                                  add_generation_prompt=False, tokenize=False)
        if tokenizer.bos_token is not None and rm_prompt.startswith(tokenizer.bos_token):
            rm_prompt = rm_prompt[len(tokenizer.bos_token):]
        output = asyncio.run(classify({"model": "/models/grm", "input": rm_prompt, "use_activation": False}))
        assert output["data"][-1]["probs"][-1] == pytest.approx(want, abs=1e-5)
    assert output["object"] == "list" and output["id"].startswith("classify-") and output["model"] == "/models/grm"
    assert set(output["data"][0]) == {"index", "label", "probs", "num_classes"}
    assert output["data"][0]["num_classes"] == 1
    assert output["usage"]["prompt_tokens"] == output["usage"]["total_tokens"] > 0


def test_classify_lists_activation_and_messages(http_server, chat_scores):
    texts = ["Q: 2+2? A: 4", "Q: 2+2? A: five"]
    status, raw = post(f"{http_server.http_url}/classify", {"input": texts, "use_activation": False})
    assert status == 200 and [d["index"] for d in raw["data"]] == [0, 1]
    _, default = post(f"{http_server.http_url}/classify", {"input": texts})  # vLLM's default: the activation
    for d, r in zip(default["data"], raw["data"]):
        assert d["probs"][0] == pytest.approx(1 / (1 + math.exp(-r["probs"][0])), abs=1e-6)
    with http_server.client() as c:
        assert [d["probs"][0] for d in raw["data"]] == pytest.approx(c.score([("Q: 2+2? A:", " 4"),
                                                                             ("Q: 2+2? A:", " five")]), abs=1e-5)
    messages = CHAT + [{"role": "assistant", "content": RESPONSES[1]}]
    _, chat = post(f"{http_server.http_url}/classify", {"messages": messages, "use_activation": False})
    assert chat["data"][0]["probs"][0] == pytest.approx(chat_scores[1], abs=1e-5)


@pytest.mark.parametrize("path, body, field", [
    ("/get_reward", b"{not json", "body"),
    ("/get_reward", {"prompts": ["p"]}, "query"),
    ("/get_reward", {"query": ["fine", 7]}, "query[1]"),
    ("/get_reward", {"query": ["a", "b"], "prompts": ["a"]}, "prompts"),
    ("/get_reward", {"query": ["x"] * 17}, "query"),  # over --limits.max_pairs_per_request (16)
    ("/get_reward", {"query": ["   "]}, "query[0]"),
    ("/get_reward", {"query": ["word " * 400]}, "query[0]"),  # over the 256-token limit
    ("/classify", {"input": [[1, 2, 3]]}, "input[0]"),
    ("/classify", {"input": "x", "use_activation": "no"}, "use_activation"),
    ("/classify", {"input": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("/classify", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0]"),
    ("/classify", {"messages": [{"role": "user", "content": "hi"}]}, "messages"),
    ("/classify", {"model": "m"}, "input"),
])
def test_bad_input_is_400_naming_the_field(http_server, path, body, field):
    status, answer = post(http_server.http_url + path, body)
    assert status == 400, answer
    assert answer["error"]["param"] == field and answer["error"]["type"] == "INVALID_ARGUMENT"
    assert answer["error"]["message"].startswith(f"{field}:")
    assert post(f"{http_server.http_url}/get_reward", {"query": ["still serving"]})[0] == 200


def test_truncation_when_asked(http_server):
    status, answer = post(f"{http_server.http_url}/get_reward", {"query": ["word " * 400], "truncate": True})
    assert status == 200 and answer["extra_logs"]["sequence_tokens"] == [256]
    status, answer = post(f"{http_server.http_url}/classify", {"input": "word " * 400, "truncate_prompt_tokens": 100})
    assert status == 200 and answer["usage"]["prompt_tokens"] == 100


def test_metrics_count_http_calls_by_route_and_code(http_server):
    before = scrape(http_server)
    assert post(f"{http_server.http_url}/get_reward", {"query": ["a b"]})[0] == 200
    assert post(f"{http_server.http_url}/classify", {"input": ["a", "b"]})[0] == 200
    assert post(f"{http_server.http_url}/classify", {"input": []})[0] == 400
    after = scrape(http_server)

    def delta(labels, name="grm_serve_requests_total"):
        return metric_value(after, name, labels) - metric_value(before, name, labels)

    assert delta({"method": "/get_reward", "code": "OK"}) == 1
    assert delta({"method": "/classify", "code": "OK"}) == 1
    assert delta({"method": "/classify", "code": "INVALID_ARGUMENT"}) == 1
    assert delta({}, "grm_serve_pairs_scored_total") == 3


def test_health_and_http_off_by_default(http_server, server):
    assert get(f"{http_server.http_url}/health") == (200, {"status": "SERVING"})
    assert server.app.http is None and server.app.http_port is None  # no --server.http_port: no HTTP door


def test_http_and_grpc_callers_share_one_batch(make_server):
    """While the model is busy, an HTTP call and a gRPC call queue up; the next step scores both in
    one score_pairs call of the runner."""
    server = make_server(slow=0.0, http_port=0)
    runner = server.app.engine.runner
    renderer = server.app.engine.renderer()
    runner.gate.clear()  # the next score_pairs call holds the model
    with server.client() as c, cf.ThreadPoolExecutor(3) as pool:
        busy = pool.submit(c.score, [("keeps the model busy", " r")])
        _wait_for(lambda: runner.calls.count("pairs") >= 2)  # warm-up's call, then the busy one
        via_http = pool.submit(post, f"{server.http_url}/get_reward", {"query": ["HTTP caller's text"]})
        via_grpc = pool.submit(c.score, [("gRPC caller's prompt", " and response")])
        _wait_for(lambda: metric_value(scrape(server), "grm_serve_queue_depth_pairs") == 2)
        runner.gate.set()
        busy.result(), via_grpc.result()
        assert via_http.result()[0] == 200
    http_row = renderer.encode_text("HTTP caller's text", max_tokens=256)
    grpc_row = renderer.encode("gRPC caller's prompt", [" and response"], max_tokens=256)
    rows = (http_row.prompt_ids + http_row.response_ids[0], grpc_row.prompt_ids + grpc_row.response_ids[0])
    assert any(rows[0] in batch and rows[1] in batch for batch in runner.batches), runner.batches


def _wait_for(condition, seconds: float = 60.0) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.02)


def test_full_queue_is_429(make_server):
    server = make_server(http_port=0, max_queue_pairs=2)
    status, answer = post(f"{server.http_url}/get_reward", {"query": ["a", "b", "c"]})  # 3 pairs > a queue of 2
    assert status == 429 and answer["error"]["type"] == "RESOURCE_EXHAUSTED"
    assert post(f"{server.http_url}/get_reward", {"query": ["a", "b"]})[0] == 200
    assert metric_value(scrape(server), "grm_serve_requests_total",
                        {"method": "/get_reward", "code": "RESOURCE_EXHAUSTED"}) == 1


def test_token_required(tiny_checkpoint, monkeypatch):
    from grmserve.server.app import build_engine

    monkeypatch.setenv("GRM_SERVE_TOKEN", "s3cret")
    cfg = tiny_config(tiny_checkpoint, http_port=0)
    cfg.server.require_token = True
    with ServerThread(cfg, build_engine(cfg)) as st:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, answer = post(f"{st.http_url}/get_reward", {"query": ["a"]}, headers)
            assert status == 401 and answer["error"]["type"] == "UNAUTHENTICATED"
        assert post(f"{st.http_url}/get_reward", {"query": ["a"]}, {"Authorization": "Bearer s3cret"})[0] == 200
        assert get(f"{st.http_url}/health")[0] == 200  # probes need no token


@pytest.mark.parametrize("error, status", [(QueueFullError("full"), 429), (NotServingError("draining"), 503),
                                           (DeadlineExpiredError("late"), 504)])
def test_engine_errors_become_http_statuses(tokenizer, error, status):
    from grmserve.server.config import local

    from .test_engine_seam import ScriptedEngine

    engine = ScriptedEngine(tokenizer)
    cfg = local()
    cfg.server.http_port = 0
    with ServerThread(cfg, engine) as st:
        engine.fail = error
        code, answer = post(f"{st.http_url}/classify", {"input": "hello"})
        assert code == status and str(error) in answer["error"]["message"]
        engine.fail = None
        assert post(f"{st.http_url}/classify", {"input": "hello"})[0] == 200
        st.app.http.serving = False  # what loading and draining look like from outside
        assert post(f"{st.http_url}/classify", {"input": "hello"})[0] == 503
        assert get(f"{st.http_url}/health") == (503, {"status": "NOT_SERVING"})
