"""bench/http_vs_grpc: the HTTP door against gRPC on one server, C concurrent callers. Prints JSON.

Not a test. One server (`--server.http_port` on) scores the same pairs through three doors, taking
turns round by round (these shared machines drift by tens of percent within minutes, so only
interleaved numbers compare), each pass from an empty prefix cache:

- `grpc`: `AsyncRewardClient.score([pair])`, chat messages rendered by the server;
- `http_get_reward`: OpenRLHF's request, `{"query": [prompt + response], "prompts": [prompt]}`;
- `http_classify`: verl's request, `{"input": whole text, "use_activation": false}`.

All three score the same token sequences (the HTTP texts are the chat template's renders). C
callers (asyncio tasks; aiohttp with keep-alive for HTTP) each send one pair per call until the
pairs are used up. Reported: pairs/s per door (median over rounds), p50/p99 latency, and the
median of the per-round ratios HTTP / gRPC.

    python bench/http_vs_grpc.py                                   # default model, C=32, 3 rounds
    python bench/http_vs_grpc.py --tiny --pairs 256 --rounds 3     # a tiny random model: transport cost
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from grmserve.clients.reward_client import AsyncRewardClient
from grmserve.server.background import ServerThread
from grmserve.server.config import local
from grmserve.training.synthetic_prefs import make_pairs

DOORS = ("grpc", "http_get_reward", "http_classify")


def tiny_checkpoint(workdir: Path) -> Path:
    """A tiny random GRM model (2 layers, hidden 64) with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    from grmserve.training.core import assets
    from grmserve.training.core.checkpoint import save_grm
    from grmserve.training.core.model import GRMConfig, HeadConfig, init_grm

    tokenizer = AutoTokenizer.from_pretrained(assets.tokenizer_dir())
    config = assets.tiny_llama_config(len(tokenizer), hidden_size=64, layers=2)
    grm = GRMConfig(head=HeadConfig(type="mlp", dropout=0.0, hidden=32), model_name="tiny-bench", model_version="0")
    out = workdir / "tiny-grm"
    save_grm(init_grm(config, grm=grm, seed=0).eval(), tokenizer, out)
    return out


def requests_for(pairs, tokenizer) -> dict[str, list]:
    """What each door sends for each (chat prompt, response) pair."""
    grpc, get_reward, classify = [], [], []
    for chat, response in pairs:
        prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": response}], tokenize=False)
        grpc.append([(chat, response)])
        get_reward.append({"query": [whole.rstrip()], "prompts": [prompt], "labels": [None]})
        classify.append({"model": "grm", "input": whole, "use_activation": False})
    return {"grpc": grpc, "http_get_reward": get_reward, "http_classify": classify}


async def closed_loop(send, requests: list, concurrency: int) -> dict:
    """C callers take the next request until none is left; wall time and each call's latency."""
    queue = list(reversed(requests))
    latencies: list[float] = []

    async def caller():
        while queue:
            request = queue.pop()
            t = time.perf_counter()
            await send(request)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return {"seconds": time.perf_counter() - start, "latencies": latencies}


async def one_pass(door: str, requests: list, server: ServerThread, concurrency: int) -> dict:
    if door == "grpc":
        async with AsyncRewardClient(server.target, timeout=600) as client:
            return await closed_loop(client.score, requests, concurrency)
    path = "/get_reward" if door == "http_get_reward" else "/classify"
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def send(body):
            async with session.post(server.http_url + path, json=body) as response:
                response.raise_for_status()
                await response.json()

        return await closed_loop(send, requests, concurrency)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarise(runs: list[dict], pairs: int) -> dict:
    latencies = [t for r in runs for t in r["latencies"]]
    return {"pairs_per_s": statistics.median(pairs / r["seconds"] for r in runs),
            "pairs_per_s_per_round": [round(pairs / r["seconds"], 2) for r in runs],
            "p50_ms": 1000 * percentile(latencies, 0.5), "p99_ms": 1000 * percentile(latencies, 0.99)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="", help="checkpoint folder (default: the default model)")
    p.add_argument("--tiny", action="store_true", help="serve a tiny random model (measures the transports)")
    p.add_argument("--precision", default="fp32", choices=["auto", "fp8", "bf16", "fp32"])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--pairs", type=int, default=256, help="pairs per pass (one per call)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        config = local()
        config.model.checkpoint = str(tiny_checkpoint(Path(tmp))) if args.tiny else args.checkpoint
        config.model.precision = args.precision
        config.server.http_port = 0
        config.limits.max_pairs_per_request = max(config.limits.max_pairs_per_request, args.pairs)
        rows = make_pairs(args.pairs // 2 + 1, seed=0)
        pairs = [(r["prompt"], r[side]) for r in rows for side in ("chosen", "rejected")][:args.pairs]
        with ServerThread(config) as server:
            engine = server.app.engine
            requests = requests_for(pairs, engine.renderer().tokenizer)
            runs: dict[str, list] = {door: [] for door in DOORS}
            for _ in range(args.rounds):
                for door in DOORS:
                    engine.run_sync(engine.runner.cache.clear)  # every pass from an empty prefix cache
                    runs[door].append(asyncio.run(one_pass(door, requests[door], server, args.concurrency)))
            info = engine.info
    result = {door: summarise(runs[door], len(pairs)) for door in DOORS}
    for door in DOORS[1:]:
        result[door]["vs_grpc"] = statistics.median(
            g["seconds"] / h["seconds"] for g, h in zip(runs["grpc"], runs[door]))
    print(json.dumps({"model": info.model_name, "precision": info.precision, "device": info.device,
                      "concurrency": args.concurrency, "pairs_per_pass": len(pairs), "rounds": args.rounds,
                      "doors": result}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
