"""`grm-bon --eval`: reward over-optimisation curves of best-of-n on the bundled benchmark.

The GRM paper's protocol (Yang et al. 2024, after Gao et al. 2023): for held-out prompts, sample N
candidates once; a proxy reward model picks the best of n; plot the gold reward of its pick against
KL_bon = ln n − (n − 1)/n, the KL divergence of the best-of-n policy from the sampling policy. A proxy
that generalises keeps raising the gold reward as n grows; one that is exploited flattens or falls.

- **Samples** (`<out>/samples.jsonl`): N candidates per prompt from the policy, one line per prompt,
  appended and flushed per batch, so an interrupted run continues where it stopped.
- **Proxy scores** (`<out>/scores-<name>.jsonl`): each reward model's score of every candidate
  (identical candidates scored once), cached per model and resumable the same way; a cache made by
  another model version is refused.
- **Curves**: for n = 1, 2, 4, … N the expected proxy and gold reward of the proxy's pick, over
  all C(N, n) subsets at once (`expected_best_of_n`), averaged over prompts; the gold reward is
  the benchmark's own (`gold_reward`, the fraction of instructions followed). `curves.json` holds
  the table, `curves.png` the plot (gold and proxy against KL_bon, one row per split).

    >>> expected_best_of_n([0.1, 0.5, 0.3], [0.0, 1.0, 0.5], [1, 2, 3])
    [0.5, 0.8333333333333333, 1.0]
    >>> round(kl_bon(4), 4)
    0.6363
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from grmserve.clients.best_of_n import Generator, score_deduped
from grmserve.clients.reward_client import RewardClient

from .benchmark import gold_reward, load_prompts

log = logging.getLogger(__name__)


# -- the estimator ------------------------------------------------------------------------------


def kl_bon(n: int) -> float:
    """KL divergence of the best-of-n policy from the base policy: ln n − (n − 1)/n."""
    return math.log(n) - (n - 1) / n


def n_values(N: int) -> list[int]:
    """1, 2, 4, … up to N, and N itself.

    >>> n_values(32), n_values(48)
    ([1, 2, 4, 8, 16, 32], [1, 2, 4, 8, 16, 32, 48])
    """
    ns = [1 << k for k in range(N.bit_length()) if 1 << k <= N]
    return ns if ns[-1] == N else ns + [N]


def pick_probabilities(N: int, n: int) -> np.ndarray:
    """P(the i-th smallest of N items is the maximum of a uniformly random n-subset), i = 1..N:
    C(i − 1, n − 1) / C(N, n) (the other n − 1 members come from the i − 1 below it). Exact integers,
    then one division, so large N and n lose nothing.

    >>> pick_probabilities(4, 2).tolist()
    [0.0, 0.16666666666666666, 0.3333333333333333, 0.5]
    """
    if not 1 <= n <= N:
        raise ValueError(f"n must be in 1..N={N}, got {n}")
    total = math.comb(N, n)
    return np.array([math.comb(i - 1, n - 1) / total for i in range(1, N + 1)])


def expected_best_of_n(proxy: Sequence[float], values: Sequence[float], ns: Sequence[int]) -> list[float]:
    """E[values[pick]] where pick = argmax of `proxy` over a uniformly random size-n subset of the N
    candidates, for each n in `ns`: the unbiased estimate over all C(N, n) subsets, not a single draw.
    Ties in `proxy` are broken uniformly at random: within a group of equal proxy scores every member
    is equally likely to be the pick, so each one's value is replaced by its group's mean (exact,
    because the chance that the pick falls in a group does not depend on the order inside it).

    >>> expected_best_of_n([1.0, 1.0], [0.0, 1.0], [1, 2])   # a tie: either one, equally likely
    [0.5, 0.5]
    """
    proxy, values = np.asarray(proxy, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if proxy.shape != values.shape or proxy.ndim != 1 or not len(proxy):
        raise ValueError(f"proxy and values must be equal-length non-empty vectors, got {proxy.shape} {values.shape}")
    order = np.argsort(proxy, kind="stable")
    p, v = proxy[order], values[order].copy()
    _, starts, counts = np.unique(p, return_index=True, return_counts=True)  # p is sorted: groups are runs
    for s, c in zip(starts, counts):
        if c > 1:
            v[s:s + c] = v[s:s + c].mean()
    return [float(pick_probabilities(len(p), n) @ v) for n in ns]


# -- caches -------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> dict[str, dict]:
    """Records by "id"; a torn last line (a killed run) is skipped."""
    out: dict[str, dict] = {}
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "id" in rec:
                out[rec["id"]] = rec
    return out


class JsonlAppender:
    """Appends records to a JSONL cache, flushed and synced per write (thread-safe); cuts a torn last line first."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size:
            data = path.read_bytes()
            if not data.endswith(b"\n"):
                path.write_bytes(data[:data.rfind(b"\n") + 1])
        self._fh = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, records: list[dict]) -> None:
        with self._lock:
            for rec in records:
                self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def check_meta(path: Path, meta: dict, what: str) -> None:
    """Write `meta` next to a cache, or refuse a cache that was made with other settings."""
    if path.exists():
        old = json.loads(path.read_text())
        if old != meta:
            diff = {k: (old.get(k), meta.get(k)) for k in sorted(set(old) | set(meta)) if old.get(k) != meta.get(k)}
            raise ValueError(f"{path}: the cached {what} were made with other settings {diff} (cached, now); "
                             "use another --curve.out or delete the cache")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta, indent=2) + "\n")


def eval_prompts(splits: Sequence[str], per_split: int, seed: int) -> list[dict]:
    """The held-out prompts: a seeded random subset of `per_split` prompts of each split (0: all)."""
    out = []
    for split in splits:
        rows = sorted(load_prompts(split), key=lambda r: r["id"])
        if not rows:
            raise ValueError(f"the benchmark has no prompts in split {split!r}")
        if per_split and per_split < len(rows):
            rows = random.Random(f"{seed}:{split}").sample(rows, per_split)
        out.extend(rows)
    return out


# -- the run ------------------------------------------------------------------------------------


def sample_candidates(cfg, prompts: list[dict], out: Path, make_generator: Callable[[], Generator]
                      ) -> dict[str, list[str]]:
    """N candidates per prompt, from the cache where there, else from the policy `make_generator()`
    builds when there is sampling to do (appended per batch)."""
    from tqdm import tqdm

    pol, N = cfg.policy, cfg.curve.samples
    check_meta(out / "samples.meta.json", {"model": pol.model, "url": pol.url, "temperature": pol.temperature,
                                           "top_p": pol.top_p, "max_tokens": pol.max_tokens, "samples": N}, "samples")
    cache = out / "samples.jsonl"
    done = read_jsonl(cache)
    todo = [p for p in prompts if p["id"] not in done]
    log.info("samples: %d prompts cached in %s, %d to sample (N=%d)", len(prompts) - len(todo), cache, len(todo), N)
    if todo:
        generator = make_generator()
        writer = JsonlAppender(cache)
        try:
            with tqdm(total=len(todo), desc=f"sampling N={N}", unit="prompt") as bar:
                for start in range(0, len(todo), cfg.batch_prompts):
                    batch = todo[start:start + cfg.batch_prompts]
                    texts = generator.generate([p["messages"] for p in batch], N)
                    recs = [{"id": p["id"], "split": p["split"], "candidates": t} for p, t in zip(batch, texts)]
                    writer.write(recs)
                    done.update((r["id"], r) for r in recs)
                    bar.update(len(batch))
        finally:
            writer.close()
            generator.close()
    return {p["id"]: done[p["id"]]["candidates"] for p in prompts}


def reward_models(cfg) -> list[tuple[str, str]]:
    """(name, target) of every proxy reward model: `--curve.reward_models name=target,...`, else
    --reward.target (named by its model version)."""
    if not cfg.curve.reward_models:
        return [("", cfg.reward.target)]
    out = []
    for spec in cfg.curve.reward_models:
        name, sep, target = spec.partition("=")
        if not sep or not name or not target:
            raise ValueError(f"--curve.reward_models: {spec!r} is not name=host:port")
        out.append((name, target))
    return out


def score_candidates(cfg, name: str, client: RewardClient, prompts: list[dict], candidates: dict[str, list[str]],
                     out: Path) -> tuple[str, dict, dict[str, list[float]]]:
    """Every candidate's proxy score from the reward server `client` talks to (cached per model)."""
    from tqdm import tqdm

    target = client.target
    info = client.info()
    name = name or info.model_version or info.model_name
    model = {"target": target, "model_name": info.model_name, "model_version": info.model_version,
             "precision": info.precision}
    check_meta(out / f"scores-{name}.meta.json", {"model_name": info.model_name,
                                                  "model_version": info.model_version}, f"scores of {name}")
    cache = out / f"scores-{name}.jsonl"
    done = read_jsonl(cache)
    todo = [p for p in prompts if p["id"] not in done]
    log.info("%s (%s at %s): %d prompts scored, %d to score", name, info.model_version, target,
             len(prompts) - len(todo), len(todo))
    writer = JsonlAppender(cache)

    def one(p: dict) -> dict:
        scores, distinct = score_deduped(client, p["messages"], candidates[p["id"]],
                                         truncate=cfg.reward.truncate)
        rec = {"id": p["id"], "scores": scores, "distinct": distinct}
        writer.write([rec])
        return rec

    # about as many candidates in flight as best-of-n's --reward.concurrency prompts of --n would put
    # there (N candidates a prompt: 64 at N = 32), so the server's queue limit is never the bottleneck
    in_flight = max(1, min(cfg.reward.concurrency, cfg.reward.concurrency * cfg.n // cfg.curve.samples))
    try:
        with ThreadPoolExecutor(in_flight) as pool, \
                tqdm(total=len(todo), desc=f"scoring ({name})", unit="prompt") as bar:
            for rec in pool.map(one, todo):
                done[rec["id"]] = rec
                bar.update(1)
    finally:
        writer.close()
    return name, model, {p["id"]: done[p["id"]]["scores"] for p in prompts}


def sem_over_prompts(values: np.ndarray) -> list[float]:
    """(prompts, len(ns)) → the standard error of the mean over prompts, per n (0 for one prompt)."""
    if len(values) < 2:
        return [0.0] * values.shape[1]
    return (values.std(0, ddof=1) / math.sqrt(len(values))).tolist()


def median_correlation(a: list[list[float]], b: list[list[float]]) -> float:
    """Median over prompts of the Pearson correlation between two proxies' scores of the same
    candidates (prompts whose scores are all equal under either proxy are left out; NaN if none is left).

        >>> round(median_correlation([[1, 2, 3], [1, 1, 1]], [[2, 4, 7], [0, 1, 2]]), 4)
        0.9934
    """
    rs = [float(np.corrcoef(x, y)[0, 1]) for x, y in zip(a, b) if np.ptp(x) > 0 and np.ptp(y) > 0]
    return float(np.median(rs)) if rs else float("nan")


def curves(prompts: list[dict], candidates: dict[str, list[str]], scores: dict[str, dict[str, list[float]]],
           ns: list[int]) -> dict:
    """The table: per split, per reward model, the mean over prompts of the expected gold and proxy
    reward of best-of-n (and the gold reward's standard error over prompts); per further reward model,
    its gold reward minus the first one's, paired by prompt (`gold_vs_<first>`, with its standard
    error: the same samples under both proxies, so prompt-to-prompt spread cancels) and how alike the
    two rank candidates (`score_corr_vs_<first>`: median over prompts of the Pearson correlation of
    their scores); plus the oracle (best-of-n by the gold reward itself, the ceiling)."""
    table: dict = {}
    for split in sorted({p["split"] for p in prompts}):
        rows = [p for p in prompts if p["split"] == split]
        gold = {p["id"]: [gold_reward(p["constraints"], t) for t in candidates[p["id"]]] for p in rows}
        entry: dict = {"prompts": len(rows), "reward_models": {}}
        first: tuple[str, np.ndarray, dict] | None = None
        for name, by_id in scores.items():
            g = np.array([expected_best_of_n(by_id[p["id"]], gold[p["id"]], ns) for p in rows])  # (P, len(ns))
            r = np.array([expected_best_of_n(by_id[p["id"]], by_id[p["id"]], ns) for p in rows])
            row = {"gold": g.mean(0).tolist(), "gold_sem": sem_over_prompts(g), "proxy": r.mean(0).tolist()}
            if first is None:
                first = (name, g, by_id)
            else:
                row[f"gold_vs_{first[0]}"] = (g - first[1]).mean(0).tolist()
                row[f"gold_vs_{first[0]}_sem"] = sem_over_prompts(g - first[1])
                row[f"score_corr_vs_{first[0]}"] = median_correlation([by_id[p["id"]] for p in rows],
                                                                      [first[2][p["id"]] for p in rows])
            entry["reward_models"][name] = row
        oracle = np.array([expected_best_of_n(gold[p["id"]], gold[p["id"]], ns) for p in rows])
        entry["oracle_gold"] = oracle.mean(0).tolist()
        entry["distinct_candidates_mean"] = float(np.mean([len(set(candidates[p["id"]])) for p in rows]))
        table[split] = entry
    return table


def plot(result: dict, path: Path) -> None:
    """Gold (left) and proxy (right) reward of best-of-n against KL_bon, one row per split."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(f"the plot needs matplotlib ({exc}): pip install 'grm-serve[bon]' (curves.json is written "
                          "already)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(result["splits"])
    kl = result["kl_bon"]
    fig, axes = plt.subplots(len(splits), 2, figsize=(10, 3.6 * len(splits)), squeeze=False)
    for row, split in zip(axes, splits):
        entry = result["splits"][split]
        for name, rm in entry["reward_models"].items():
            g, sem = np.array(rm["gold"]), np.array(rm["gold_sem"])
            (line,) = row[0].plot(kl, g, marker="o", label=name)
            row[0].fill_between(kl, g - sem, g + sem, color=line.get_color(), alpha=0.15)
            row[1].plot(kl, rm["proxy"], marker="o", label=name)
        row[0].plot(kl, entry["oracle_gold"], "k--", lw=1, label="gold picks (ceiling)")
        row[0].set_title(f"{split}: gold reward of the proxy's pick ({entry['prompts']} prompts, N={result['N']})")
        row[1].set_title(f"{split}: proxy reward of its pick")
        row[0].set_ylabel("gold reward (fraction of instructions followed)")
        row[1].set_ylabel("proxy reward (raw)")
        for ax in row:
            ax.set_xlabel("KL_bon = ln n - (n-1)/n")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            top = ax.secondary_xaxis("top", functions=(lambda x: x, lambda x: x))
            top.set_xticks(kl, [str(n) for n in result["ns"]], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_eval(cfg, *, build_generator: Callable[[Any], Generator], connect: Callable[[str, Any], RewardClient]) -> Path:
    """Sample (cached), score with every proxy reward model (cached), write curves.json and curves.png.
    `cfg` is grm-bon's BonConfig; `build_generator(cfg.policy)` makes the policy (called only when
    there is sampling to do), `connect(target, cfg.reward)` a reward client. Returns the output folder."""
    out = Path(cfg.curve.out)
    N = cfg.curve.samples
    if N < 2:
        raise ValueError(f"--curve.samples must be at least 2, got {N}")
    rms = reward_models(cfg)
    clients = {target: connect(target, cfg.reward) for _, target in rms}  # all up before the long sampling
    try:
        prompts = eval_prompts(cfg.curve.splits, cfg.curve.prompts, cfg.curve.seed)
        candidates = sample_candidates(cfg, prompts, out, lambda: build_generator(cfg.policy))
        scores, models = {}, {}
        for name, target in rms:
            name, model, by_id = score_candidates(cfg, name, clients[target], prompts, candidates, out)
            scores[name], models[name] = by_id, model
    finally:
        for client in clients.values():
            client.close()
    ns = n_values(N)
    pol = cfg.policy
    result = {"N": N, "ns": ns, "kl_bon": [kl_bon(n) for n in ns],
              "policy": {"model": pol.model or "SmolLM2-135M-Instruct", "url": pol.url, "temperature": pol.temperature,
                         "top_p": pol.top_p, "max_tokens": pol.max_tokens},
              "reward_models": models, "splits": curves(prompts, candidates, scores, ns)}
    (out / "curves.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "curves.png")
    for split, entry in result["splits"].items():
        for name, rm in entry["reward_models"].items():
            log.info("%s %s: gold %s", split, name, " ".join(f"n={n}:{g:.3f}" for n, g in zip(ns, rm["gold"])))
    return out
