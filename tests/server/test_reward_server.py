"""The reward server over a real gRPC channel on a loopback port (tiny random GRM model, fp32)."""

from __future__ import annotations

import concurrent.futures as cf
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from grmserve.clients.reward_client import RewardServerError
from grmserve.protos import SERVICE_NAME, reward_pb2
from grmserve.training.core.batching import plan_batches
from grmserve.training.core.checkpoint import load_grm
from grmserve.training.core.prompts import PromptRenderer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]


def direct_scores(checkpoint, pairs, max_tokens=256):
    """What the training code computes for the same checkpoint and inputs."""
    loaded = load_grm(checkpoint)
    renderer = PromptRenderer(loaded.tokenizer)
    out = []
    for prompt, response in pairs:
        g = renderer.encode(prompt, [response], max_tokens=max_tokens)
        ids = torch.tensor([g.prompt_ids + g.response_ids[0]])
        with torch.no_grad():
            out.append(float(loaded.model.score(ids, torch.ones_like(ids))[0]))
    return out


def metric_value(text: str, name: str, labels: dict | None = None) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return sample.value
    return 0.0


def scrape(server) -> str:
    import urllib.request

    return urllib.request.urlopen(f"http://127.0.0.1:{server.app.metrics_port}/metrics", timeout=10).read().decode()


def test_scores_match_training_code(server, tiny_checkpoint):
    pairs = [(CHAT, "4"), (CHAT, "Five, I think."), ("Plain text prompt:", " an answer"),
             ([{"role": "user", "content": "Hi"}], "Hello there!")]
    with server.client() as c:
        got = c.score(pairs)
        cand = c.score_candidates(CHAT, ["4", "Five, I think."])
    want = direct_scores(tiny_checkpoint, pairs)
    assert got == pytest.approx(want, abs=1e-5)
    # The shared-prompt path (KV cache reuse) gives the same rewards as scoring pairs one by one.
    assert cand == pytest.approx(want[:2], abs=1e-5)


def test_candidates_best_index_and_metadata(server):
    with server.client() as c:
        resp = c._call(c.stub.ScoreCandidates, reward_pb2.ScoreCandidatesRequest(
            prompt=reward_pb2.Prompt(messages=reward_pb2.ChatMessages(
                messages=[reward_pb2.ChatMessage(role="user", content="Hi")])),
            responses=["a", "bb", "ccc"], request_id="req-7"))
    scores = list(resp.scores)
    assert resp.best_index == max(range(3), key=lambda i: scores[i])
    assert resp.metadata.request_id == "req-7"
    assert len(resp.metadata.sequence_tokens) == 3 and list(resp.metadata.truncated) == [False] * 3
    # The shared prompt counts once in the computed tokens.
    prompt_len = (resp.metadata.sequence_tokens[0]
                  - (resp.metadata.sequence_tokens[1] - resp.metadata.sequence_tokens[0]) - 0)
    assert resp.metadata.computed_tokens < sum(resp.metadata.sequence_tokens)
    assert prompt_len > 0


def test_info_reports_model_and_limits(server):
    with server.client() as c:
        info = c.info()
    assert (info.precision, info.max_tokens, info.max_pairs_per_request, info.max_candidates) == ("fp32", 256, 16, 16)
    assert info.head_type == "mlp" and info.checkpoint_format == "grm" and info.chat_template


@pytest.mark.parametrize("request_factory, field, method", [
    (lambda: reward_pb2.ScoreRequest(), "pairs", "Score"),
    (lambda: reward_pb2.ScoreRequest(pairs=[reward_pb2.Pair(prompt=reward_pb2.Prompt(text="p"), response="r")] * 17),
     "limit of 16", "Score"),
    (lambda: reward_pb2.ScoreRequest(pairs=[reward_pb2.Pair(response="r")]), "pairs[0].prompt", "Score"),
    (lambda: reward_pb2.ScoreRequest(pairs=[reward_pb2.Pair(prompt=reward_pb2.Prompt(text=""), response="r")]),
     "pairs[0].prompt", "Score"),
    (lambda: reward_pb2.ScoreRequest(pairs=[reward_pb2.Pair(prompt=reward_pb2.Prompt(text="p"), response="r"),
                                            reward_pb2.Pair(prompt=reward_pb2.Prompt(text="p"), response="")]),
     "pairs[1].response", "Score"),
    (lambda: reward_pb2.ScoreRequest(pairs=[reward_pb2.Pair(prompt=reward_pb2.Prompt(messages=reward_pb2.ChatMessages(
        messages=[reward_pb2.ChatMessage(role="wizard", content="x")])), response="r")]),
     "pairs[0].prompt.messages[0].role", "Score"),
    (lambda: reward_pb2.ScoreRequest(pairs=[reward_pb2.Pair(
        prompt=reward_pb2.Prompt(messages=reward_pb2.ChatMessages()), response="r")]),
     "pairs[0].prompt.messages", "Score"),
    (lambda: reward_pb2.ScoreRequest(pairs=[reward_pb2.Pair(prompt=reward_pb2.Prompt(text="word " * 400),
                                                            response="r")]),
     "limit of 256", "Score"),
    (lambda: reward_pb2.ScoreCandidatesRequest(prompt=reward_pb2.Prompt(text="p")), "responses", "ScoreCandidates"),
    (lambda: reward_pb2.ScoreCandidatesRequest(prompt=reward_pb2.Prompt(text="p"), responses=["r"] * 17),
     "limit of 16", "ScoreCandidates"),
    (lambda: reward_pb2.ScoreCandidatesRequest(responses=["r"]), "prompt", "ScoreCandidates"),
])
def test_bad_input_is_invalid_argument_and_server_keeps_serving(server, request_factory, field, method):
    with server.client() as c:
        with pytest.raises(RewardServerError) as err:
            c._call(getattr(c.stub, method), request_factory())
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert field in str(err.value)
        assert len(c.score([("still", " serving")])) == 1


def test_truncation_when_asked(server):
    long_prompt = "word " * 400
    with server.client() as c:
        resp = c.score_full([(long_prompt, " fine")], truncate=True)
    assert list(resp.metadata.truncated) == [True]
    assert resp.metadata.sequence_tokens[0] == 256


def test_concurrent_callers_get_their_own_scores(server, tiny_checkpoint):
    pairs = [([{"role": "user", "content": f"Question {i}?"}], f"Answer number {i} " * (1 + i % 5)) for i in range(24)]
    want = direct_scores(tiny_checkpoint, pairs)
    with server.client() as c, cf.ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda p: c.score([p])[0], pairs))
    assert got == pytest.approx(want, abs=1e-5)


def test_full_queue_answers_resource_exhausted(make_server):
    """The server's answer, seen by a client without retries (the default client retries it:
    tests/clients/test_reward_client.py)."""
    server = make_server(slow=0.3, max_queue_pairs=4)
    codes = []
    with server.client(retry=None) as c, cf.ThreadPoolExecutor(8) as pool:
        def call(i):
            try:
                c.score([(f"prompt {i}", " r")] * 2)
                return "OK"
            except RewardServerError as exc:
                return exc.code.name
        codes = list(pool.map(call, range(8)))
        assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes, codes
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
        assert len(c.score([("after", " the storm")])) == 1


def test_expired_deadline_is_not_computed(make_server):
    server = make_server(slow=0.6)
    renderer = server.app.engine.renderer()
    marker = renderer.encode("unique-marker-prompt", [" zz"], max_tokens=256)
    marker_row = marker.prompt_ids + marker.response_ids[0]
    with server.client() as c, server.client(timeout=0.2) as impatient, cf.ThreadPoolExecutor(2) as pool:
        busy = pool.submit(c.score, [("keeps the model busy", " r")])
        time.sleep(0.1)
        with pytest.raises(RewardServerError) as err:
            impatient.score([("unique-marker-prompt", " zz")])
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        busy.result()
        c.score([("one more", " call")])  # lets the batcher pass over the dead job
    assert marker_row not in server.app.engine.runner.seen
    text = scrape(server)
    dropped = metric_value(text, "grm_serve_jobs_total", {"outcome": "cancelled"}) + \
        metric_value(text, "grm_serve_jobs_total", {"outcome": "expired"})
    assert dropped >= 1


def test_metrics_count_what_was_sent(server):
    before = scrape(server)
    with server.client() as c:
        for _ in range(3):
            c.score([("a", " b"), ("c", " d")])
        with pytest.raises(RewardServerError):
            c.score([])
    after = scrape(server)
    ok = {"method": "Score", "code": "OK"}
    bad = {"method": "Score", "code": "INVALID_ARGUMENT"}
    assert (metric_value(after, "grm_serve_requests_total", ok)
            - metric_value(before, "grm_serve_requests_total", ok) == 3)
    assert (metric_value(after, "grm_serve_requests_total", bad)
            - metric_value(before, "grm_serve_requests_total", bad) == 1)
    assert (metric_value(after, "grm_serve_pairs_scored_total")
            - metric_value(before, "grm_serve_pairs_scored_total") == 6)
    assert metric_value(after, "grm_serve_request_seconds_count", {"method": "Score"}) >= 4
    assert metric_value(after, "grm_serve_model_info", {"precision": "fp32"}) == 1
    assert metric_value(after, "grm_serve_ready") == 1
    assert metric_value(after, "process_cpu_seconds_total") > 0


def test_health_and_reflection(server):
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    assert (health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status
            == health_pb2.HealthCheckResponse.SERVING)
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert SERVICE_NAME in names
    channel.close()


def test_bearer_token(tiny_checkpoint, monkeypatch):
    from grmserve.server.app import build_engine

    from .conftest import ServerThread, tiny_config

    monkeypatch.setenv("GRM_SERVE_TOKEN", "s3cret")
    cfg = tiny_config(tiny_checkpoint)
    cfg.server.require_token = True
    st = ServerThread(cfg, build_engine(cfg)).start()
    try:
        for token in (None, "wrong"):
            with st.client(token=token) as c:
                with pytest.raises(RewardServerError) as err:
                    c.score([("a", " b")])
                assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        with st.client(token="s3cret") as c:
            assert len(c.score([("a", " b")])) == 1
        channel = grpc.insecure_channel(st.target)  # health checks need no token (probes)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
        text = scrape(st)
        assert metric_value(text, "grm_serve_requests_total", {"method": "Score", "code": "UNAUTHENTICATED"}) == 2
    finally:
        st.stop()


def test_require_token_without_token_is_a_clear_error(tiny_checkpoint, monkeypatch):
    from grmserve.server.app import build_engine

    from .conftest import ServerThread, tiny_config

    monkeypatch.delenv("GRM_SERVE_TOKEN", raising=False)
    cfg = tiny_config(tiny_checkpoint)
    cfg.server.require_token = True
    with pytest.raises(Exception, match="GRM_SERVE_TOKEN"):
        ServerThread(cfg, build_engine(cfg)).start()


def test_plan_batches_groups_similar_lengths():
    lengths = [10, 200, 12, 190, 11, 205]
    batches = plan_batches(lengths, max_tokens=420, max_rows=8)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 420
    assert {frozenset(b) for b in batches} == {frozenset({0, 2, 4}), frozenset({3, 1}), frozenset({5})}
    assert plan_batches([5000], max_tokens=100, max_rows=4) == [[0]]


def test_fp8_server_tracks_fp32(tiny_checkpoint):
    from grmserve.server.app import build_engine

    from .conftest import ServerThread, tiny_config

    cfg = tiny_config(tiny_checkpoint)
    cfg.model.precision = "fp8"
    st = ServerThread(cfg, build_engine(cfg)).start()
    pairs = [([{"role": "user", "content": f"Tell me about topic {i}."}],
              f"Topic {i} is " + "quite " * (i % 7) + "nice.")
             for i in range(48)]
    try:
        with st.client() as c:
            assert c.info().precision == "fp8"
            got = torch.tensor([s for k in range(0, 48, 16) for s in c.score(pairs[k:k + 16])])
    finally:
        st.stop()
    want = torch.tensor(direct_scores(tiny_checkpoint, pairs))
    corr = torch.corrcoef(torch.stack([got, want]))[0, 1]
    assert corr > 0.99, corr
    assert not torch.equal(got, want)  # it really ran quantised weights


def test_server_loads_fp8_checkpoint_with_residual_columns(tiny_checkpoint, tmp_path, monkeypatch):
    """An FP8 checkpoint from `grm-quantize --keep_columns` is served as written: its scores are the
    training code's on the same checkpoint (residuals included), not those of plain FP8. The server's
    compute dtype is pinned to fp32 (on CPUs with native bf16 it would pick bf16, whose rounding
    is larger than the residuals' effect)."""
    monkeypatch.setattr("grmserve.server.engine.runner.fast_dtype", lambda device: torch.float32)
    from grmserve.server.app import build_engine
    from grmserve.training.core.fp8 import FP8InferenceLinear, convert_to_fp8
    from grmserve.training.quantize import main as quantize

    from .conftest import ServerThread, tiny_config

    out = tmp_path / "fp8-columns"
    assert quantize(["--src", str(tiny_checkpoint), "--out", str(out), "--recipe", "fp8-channel", "--keep_columns",
                     "--max_bytes_ratio", "0.58", "--calibration", "8"]) == 0
    cfg = tiny_config(out)
    st = ServerThread(cfg, build_engine(cfg)).start()
    pairs = [([{"role": "user", "content": f"Name a colour, {i}."}], "Blue " * (1 + i % 5)) for i in range(12)]
    try:
        with st.client() as c:
            assert c.info().precision == "fp8"
            got = torch.tensor(c.score(pairs))
    finally:
        st.stop()

    def scores(model):
        for m in model.modules():
            if isinstance(m, FP8InferenceLinear):
                m.compute_dtype = torch.float32  # the server's compute dtype, pinned above
        renderer = PromptRenderer(load_grm(out).tokenizer)
        res = []
        for prompt, response in pairs:
            g = renderer.encode(prompt, [response], max_tokens=256)
            ids = torch.tensor([g.prompt_ids + g.response_ids[0]])
            with torch.no_grad():
                res.append(float(model.score(ids, torch.ones_like(ids))[0]))
        return torch.tensor(res)

    loaded = load_grm(out, load_tokenizer=False).model
    assert sum(m.residual_columns for m in loaded.modules() if isinstance(m, FP8InferenceLinear)) > 0
    want = scores(loaded)
    plain = load_grm(tiny_checkpoint, load_tokenizer=False).model
    convert_to_fp8(plain, "fp8-channel")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (scores(plain) - want).abs().max() > 1e-4, "the residual columns change the scores"


def test_tls(tiny_checkpoint, tmp_path):
    import shutil
    import subprocess

    from grmserve.server.app import build_engine

    from .conftest import ServerThread, tiny_config

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    cfg = tiny_config(tiny_checkpoint, http_port=0)
    cfg.server.tls_cert, cfg.server.tls_key = str(cert), str(key)
    st = ServerThread(cfg, build_engine(cfg)).start()
    try:
        import ssl
        import urllib.request

        from grmserve.clients.reward_client import RewardClient

        with RewardClient(f"localhost:{st.app.port}", root_certificates=cert.read_bytes()) as c:
            assert len(c.score([("a", " b")])) == 1
        with RewardClient(f"localhost:{st.app.port}", root_certificates=str(cert)) as c:  # a PEM path works too
            assert len(c.score([("a", " b")])) == 1
        https = ssl.create_default_context(cafile=str(cert))  # the HTTP door serves the same certificate
        with urllib.request.urlopen(f"https://localhost:{st.app.http_port}/health", context=https, timeout=10) as r:
            assert r.status == 200
        with RewardClient(f"localhost:{st.app.port}", timeout=5) as plain:  # plaintext to a TLS port fails
            with pytest.raises(RewardServerError) as err:
                plain.score([("a", " b")])
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        st.stop()


def _full_scores(model, pairs):
    with torch.no_grad():
        return [float(model.score(torch.tensor([list(p) + r]), torch.ones(1, len(p) + len(r), dtype=torch.long))[0])
                for p, r in pairs]


def _fresh_tokens(pairs, head=()):
    """Tokens a prefix-sharing scorer must compute: every distinct prefix of the sequences once,
    except those the pinned head already holds."""
    head = tuple(head)
    prefixes = {seq[:k] for seq in (tuple(p) + tuple(r) for p, r in pairs) for k in range(1, len(seq) + 1)}
    return len({x for x in prefixes if x != head[:len(x)]})


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_score_pairs_reuses_prefix_states_and_matches_direct_scores(tiny_checkpoint, packed):
    """Every distinct prefix runs once (within a call and across calls, after the pinned head);
    scores equal scoring each prompt + response from scratch, in packed passes (no padding) and
    padded ones."""
    from grmserve.server.engine.runner import ModelRunner

    loaded = load_grm(tiny_checkpoint)
    runner = ModelRunner(loaded.model, pad_id=loaded.tokenizer.pad_token_id, cache_bytes=1 << 24, packed=packed)
    assert runner.packed == packed
    head = [5, 6, 7]
    runner.set_head(head)
    p1, p2, p3 = tuple(head + [8, 9, 10, 11]), (20, 21), tuple(head)  # head + more, no head, exactly the head
    pairs = [(p1, [40, 41]), (p2, [42, 43, 44, 45, 46]), (p1, [47]), (p3, [48, 49, 50]), (p2, [51]), ((), [52, 53]),
             (p1, [54, 55, 56, 57, 58, 59])]
    want = _full_scores(loaded.model, pairs)

    got, stats = runner.score_pairs(pairs, max_tokens=16, max_rows=2)  # several passes per wave
    assert got == pytest.approx(want, abs=1e-5)
    # Computed: each distinct prompt once, minus the head where it starts with it, plus every response.
    responses = sum(len(r) for _, r in pairs)
    assert sum(s.tokens for s in stats) == (len(p1) - 3) + len(p2) + 0 + responses == _fresh_tokens(pairs, head)
    assert all(s.rows <= 2 and s.padded_tokens <= 16 for s in stats)
    # Wave 2 (the later pairs of p1 and p2) continued what wave 1 stored: 4 hits; the rest reused at most the head.
    assert (runner.cache.stats.hits, runner.cache.stats.misses) == (3, 4)
    assert runner.cache.stats.reused_tokens == 3 + 3 + 2 * len(p1) + len(p2)  # heads of p1, p3; repeats of p1, p2
    for p, r in pairs:  # every whole sequence is cached now
        assert runner.cache.match(tuple(p) + tuple(r))[0] == len(p) + len(r)

    again, stats = runner.score_pairs(pairs)  # everything is cached: only the last token of each sequence runs
    assert again == pytest.approx(want, abs=1e-5)
    assert sum(s.tokens for s in stats) == len(pairs) and len(stats) == 1
    assert runner.cache.stats.hits == 3 + len(pairs)
    assert {s.kind for s in stats} == {"cached_prompt"}


def test_score_pairs_shares_response_prefixes_and_runs_duplicates_once(tiny_checkpoint):
    """Responses that open the same way share those tokens' state; an identical pair in the same
    call runs once and gets the same score; a sequence extending a cached one computes only its tail."""
    from grmserve.server.engine.runner import ModelRunner

    loaded = load_grm(tiny_checkpoint)
    runner = ModelRunner(loaded.model, pad_id=loaded.tokenizer.pad_token_id, cache_bytes=1 << 24)
    prompt = (11, 12, 13, 14)
    first = [(prompt, [30, 31, 32, 33]), (prompt, [30, 31, 40]), (prompt, [30, 31, 32, 33]), ((99,), [30, 31])]
    got, stats = runner.score_pairs(first)
    assert got == pytest.approx(_full_scores(loaded.model, first), abs=1e-5)
    assert got[0] == got[2]
    assert sum(s.tokens for s in stats) == _fresh_tokens(first) == 4 + 4 + 1 + 3
    assert len(stats) == 1  # the second response borrowed the first one's prompt and "30 31" in the same pass

    # A long new prompt with short responses: borrowing would pad every response's queries to the
    # prompt's length, so the others wait for a second pass instead; the prompt still runs once.
    long_prompt = tuple(range(500, 800))
    many = [(long_prompt, [40 + k, 41]) for k in range(4)]
    got, stats = runner.score_pairs(many)
    assert got == pytest.approx(_full_scores(loaded.model, many), abs=1e-5)
    assert len(stats) == 2 and sum(s.tokens for s in stats) == _fresh_tokens(many)

    later = [(prompt, [30, 31, 32, 33, 34, 35]), (prompt, [30, 31, 41])]
    got, stats = runner.score_pairs(later)
    assert got == pytest.approx(_full_scores(loaded.model, later), abs=1e-5)
    assert sum(s.tokens for s in stats) == 2 + 1  # the two new tails, after a split of the shared segment


def test_packed_passes_are_used_for_llama_and_match_padded_ones(tiny_checkpoint):
    """The default runner packs (SmolLM2 is a llama); packed and padded runners agree on a mixed
    batch: uneven lengths, with and without pasts, and store the same states."""
    from grmserve.server.engine.runner import ModelRunner

    loaded = load_grm(tiny_checkpoint)
    packed = ModelRunner(loaded.model, pad_id=loaded.tokenizer.pad_token_id, cache_bytes=1 << 24)
    padded = ModelRunner(loaded.model, pad_id=loaded.tokenizer.pad_token_id, cache_bytes=1 << 24, packed=False)
    assert packed.packed
    torch.manual_seed(0)
    prompts = [tuple(torch.randint(3, 400, (n,)).tolist()) for n in (1, 9, 30, 4)]
    pairs = [(prompts[i % 4], torch.randint(3, 400, (1 + (7 * i) % 23,)).tolist()) for i in range(11)]
    for runner in (packed, padded):
        runner.set_head(list(prompts[2][:5]))
    got_packed, _ = packed.score_pairs(pairs)
    got_padded, _ = padded.score_pairs(pairs)
    assert got_packed == pytest.approx(got_padded, abs=1e-5)
    assert got_packed == pytest.approx(_full_scores(loaded.model, pairs), abs=1e-5)
    for p, r in pairs:
        seq = tuple(p) + tuple(r)
        (n, a), (m, b) = packed.cache.match(seq), padded.cache.match(seq)
        assert n == m == len(seq)
        assert torch.allclose(torch.cat(a, dim=3), torch.cat(b, dim=3), atol=1e-5)


def test_prefix_cache_stays_within_its_byte_budget(tiny_checkpoint):
    from grmserve.server.engine.runner import ModelRunner

    loaded = load_grm(tiny_checkpoint)
    probe = ModelRunner(loaded.model, pad_id=loaded.tokenizer.pad_token_id, cache_bytes=1 << 30)
    probe.score_pairs([((1, 2, 3, 4), [5])])
    per_token = probe.cache.nbytes // 5
    runner = ModelRunner(loaded.model, pad_id=loaded.tokenizer.pad_token_id, cache_bytes=10 * per_token)
    prompts = [tuple(range(10 + 5 * k, 14 + 5 * k)) for k in range(6)]  # 5 tokens a pair: two pairs fit
    pairs = [(p, [200 + k]) for k, p in enumerate(prompts)]
    got, _ = runner.score_pairs(pairs)
    assert got == pytest.approx(_full_scores(loaded.model, pairs), abs=1e-5)
    assert runner.cache.nbytes <= 10 * per_token and len(runner.cache) == 2
    assert runner.cache.stats.evictions == 4
    assert runner.cache.match(prompts[-1])[0] == 4 and runner.cache.match(prompts[0])[0] == 0  # least recent out
    # A state bigger than the whole budget is not kept, and still scores right (reused within the call).
    long = tuple(range(100, 120))
    got, _ = runner.score_pairs([(long, [1]), (long, [2])])
    assert got == pytest.approx(_full_scores(loaded.model, [(long, [1]), (long, [2])]), abs=1e-5)
    assert runner.cache.match(long)[0] == 0 and runner.cache.stats.reused_tokens >= len(long)


def test_template_head_is_the_chat_prefix(tiny_checkpoint):
    from grmserve.server.app import template_head

    renderer = PromptRenderer(load_grm(tiny_checkpoint).tokenizer)
    head = template_head(renderer)
    g = renderer.encode([{"role": "user", "content": "Tell me a story."}], ["ok"], max_tokens=256)
    assert len(head) > 3 and g.prompt_ids[:len(head)] == head
    assert "user" in renderer.tokenizer.decode(head) and "story" not in renderer.tokenizer.decode(head)
    assert template_head(PromptRenderer(load_grm(tiny_checkpoint).tokenizer, use_chat_template=False)) == []


def test_score_with_repeated_prompts_matches_training_code(make_server, tiny_checkpoint):
    server = make_server(slow=0.0)
    prompts = [[{"role": "user", "content": f"Prompt number {k} " + "context " * (40 + 3 * k)}] for k in range(4)]
    pairs = [(prompts[i % 4], f"response {i} " * (1 + i % 3)) for i in range(14)]
    pairs.append(("a unique plain prompt", " with its answer"))
    want = direct_scores(tiny_checkpoint, pairs)
    with server.client() as c, cf.ThreadPoolExecutor(4) as pool:
        whole = c.score(pairs)
        split = [s for part in pool.map(c.score, [pairs[:7], pairs[7:]]) for s in part]
    assert whole == pytest.approx(want, abs=1e-5)
    assert split == pytest.approx(want, abs=1e-5)
    text = scrape(server)
    # First call: the four numbered prompts open alike ("Prompt number"), so one of them and the plain
    # prompt run first (2 misses) and the other 13 sequences continue what those stored (hits).
    assert metric_value(text, "grm_serve_prefix_cache_lookups_total", {"result": "miss"}) == 2
    # The second round found all 15 whole sequences cached.
    assert metric_value(text, "grm_serve_prefix_cache_lookups_total", {"result": "hit"}) == 13 + 15
    assert metric_value(text, "grm_serve_prefix_cache_entries") >= 15  # a segment per response at least
    assert metric_value(text, "grm_serve_prefix_reused_tokens_total") > 0
