"""`grm-ppo`'s loop: rollouts from the current policy, scored remotely by grm-serve, PPO updates.

One step:

1. take `rollout.batch_size` prompts (a seeded permutation per pass over the prompts, a pure
   function of the step, so a resumed run sees the same prompts);
2. sample one response per prompt, `rollout.chunk_size` prompts at a time, and send each chunk for
   scoring as soon as it exists (a background thread: scoring chunk k overlaps generating chunk k+1
   and the log-prob passes below);
3. compute the rollouts' log-probs, values and reference log-probs (no gradients);
4. wait for the scores; whiten and clip them; per-token rewards = score on the last token minus
   `kl_coef` × KL to the reference; GAE advantages and returns;
5. `ppo.epochs` passes over the batch in minibatches (one optimizer step each, `grad_accum`
   micro-batches): clipped policy loss + `value_coef` × clipped value loss (- entropy bonus);
6. update the KL coefficient, log, evaluate the gold reward every `eval.every` steps, checkpoint.

Run folder: config.json, metrics.jsonl (one line per step; `"split": "eval"` lines for the gold
reward), checkpoints/step-NNNNNNN/ (trainable.safetensors, trainer_state.pt: optimizer, scheduler,
RNG, KL controller, step), and at the end policy/ (a Hugging Face folder, LoRA merged).
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..components import (
    MetricsLog,
    adamw_factory,
    add_lora,
    build_scheduler,
    load_backbone,
    progress,
    step_if_finite,
)
from ..core.configtools import to_dict
from ..core.devices import resolve_device
from ..core.fsutil import staged_dir
from ..precision import apply_precision, release_precision
from ..trainer import (
    STATE_FILE,
    TRAINABLE_FILE,
    checkpoint_name,
    latest_checkpoint,
    prune_checkpoints,
    quiet_hf_progress,
    rng_state,
    set_rng_state,
    trim_metrics,
)
from .config import PPOConfig
from .losses import (
    KLController,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from .rollout import (
    PolicyWithValue,
    RemoteScorer,
    RewardServiceDown,
    ScoreResult,
    collate,
    encode_prompts,
    eos_ids,
    generate,
    load_prompt_rows,
    pad_rows,
    token_logprobs,
)

log = logging.getLogger(__name__)

PPO_STATE_VERSION = 1


@dataclass
class Rollouts:
    """One step's rollouts, per row: prompt and response ids, and (after `score_and_advantage`) the
    padded (B, R) tensors the update reads."""

    prompts: list[list[int]]
    responses: list[list[int]]
    ended: list[bool]
    old_logp: torch.Tensor  # (B, R)
    ref_logp: torch.Tensor  # (B, R)
    values: torch.Tensor  # (B, R)
    mask: torch.Tensor  # (B, R)
    entropy: float
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


class PPOTrainer:
    """Builds the policy, reference, optimizer, prompts and scorer from a `PPOConfig`; `fit()` runs.

    >>> from grmserve.training.ppo.presets import tiny
    >>> cfg = tiny(); cfg.reward.address = "localhost:50051"       # doctest: +SKIP
    >>> PPOTrainer(cfg).fit()["step"]                               # doctest: +SKIP
    8
    """

    def __init__(self, cfg: PPOConfig):
        self.cfg = cfg.validate()
        self.device = resolve_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resume_from = latest_checkpoint(self.ckpt_dir)
        if resume_from is not None and not cfg.resume:
            raise ValueError(f"{self.run_dir} already holds checkpoints (newest {resume_from.name}); pass --resume "
                             "to continue that run, or choose another --run_dir")

        # Prompts (training and held-out), then the policy, its value head and the reference.
        p = cfg.policy
        lm, self.tokenizer = load_backbone(p.backbone, seed=cfg.seed, tiny_hidden_size=p.tiny_hidden_size,
                                           tiny_layers=p.tiny_layers)
        self.pad_id, self.eos = self.tokenizer.pad_token_id, eos_ids(self.tokenizer, lm)
        rows = load_prompt_rows(cfg.data.prompts, cfg.data.split, limit=cfg.data.limit)
        self.rows, self.prompt_ids = encode_prompts(self.tokenizer, rows, cfg.rollout.max_prompt_tokens)
        if len(self.rows) < cfg.rollout.batch_size:
            raise ValueError(f"{len(self.rows)} prompts is fewer than rollout.batch_size={cfg.rollout.batch_size}")
        self.steps_per_pass = len(self.rows) // cfg.rollout.batch_size
        self.eval_rows, self.eval_ids = self.build_eval_prompts()
        self.ref_lm = None
        if p.lora.enabled:
            lm = add_lora(lm, p.lora)  # the reference is this model with its adapters switched off
        else:
            self.ref_lm = copy.deepcopy(lm).eval().requires_grad_(False).to(self.device)
        torch.manual_seed(cfg.seed)
        model = PolicyWithValue(lm, init_std=p.value_head_init_std)

        # Precision plan, optimizer, schedule, KL controller.
        optim = cfg.optim.to_train_optim()
        plan = apply_precision(model, adamw_factory(optim, head_prefix="v_head."), cfg.precision, device=self.device)
        self.model, self.optimizer, self.autocast = plan.model, plan.optimizer, plan.autocast
        self.updates_per_step = cfg.ppo.epochs * (cfg.rollout.batch_size // cfg.ppo.minibatch_size)
        self.scheduler = build_scheduler(self.optimizer, optim, total_steps=cfg.steps * self.updates_per_step)
        self.kl_ctl = KLController(cfg.kl.coef, mode=cfg.kl.mode, target=cfg.kl.target, horizon=cfg.kl.horizon)
        self.step, self.saved_step = 0, None
        self.skipped_steps = 0
        """PPO updates skipped for an inf/NaN gradient norm (`step_if_finite`); checkpointed."""
        torch.manual_seed(cfg.seed)  # sampling; restored exactly on resume
        random.seed(cfg.seed)
        if resume_from is not None:
            self.step = self.saved_step = self.load_checkpoint(resume_from)
            log.info("resumed from %s at step %d", resume_from, self.step)
        (self.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        trim_metrics(self.run_dir / "metrics.jsonl", self.step)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.scorer = RemoteScorer(cfg.reward)

    # -- builders -----------------------------------------------------------------------------
    def build_eval_prompts(self) -> tuple[list[dict], list[list[int]]]:
        """Held-out benchmark prompts (with their constraints, for the gold reward)."""
        e = self.cfg.eval
        if not e.every or not e.prompts:
            return [], []
        from ..benchmark import load_prompts

        rows, ids = encode_prompts(self.tokenizer, load_prompts(e.split), self.cfg.rollout.max_prompt_tokens)
        return rows[:e.prompts], ids[:e.prompts]

    @property
    def lm(self):
        return self.model.lm

    # -- data position ------------------------------------------------------------------------
    def batch_indices(self, step: int) -> list[int]:
        """The prompts of step `step` (a pure function of the step: exact resume)."""
        pass_, index = divmod(step, self.steps_per_pass)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + pass_)
        order = torch.randperm(len(self.rows), generator=g)
        b = self.cfg.rollout.batch_size
        return order[index * b:(index + 1) * b].tolist()

    # -- 1-4: rollouts ------------------------------------------------------------------------
    def response_text(self, response: list[int], ended: bool) -> str:
        """What the reward server scores: the response without its end token (the server closes the
        assistant turn itself, as training did)."""
        return self.tokenizer.decode(response[:-1] if ended else response, skip_special_tokens=False)

    def prompt_for_server(self, row: dict) -> Any:
        if self.cfg.reward.chat:
            return row["messages"]
        return self.tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def forward_rollouts(self, prompts: list[list[int]], responses: list[list[int]]):
        """Per row: log-probs and values under the current policy, log-probs under the reference; and
        the mean entropy of the policy over response tokens."""
        c = collate(prompts, responses, self.pad_id, self.device)
        temperature = self.cfg.rollout.temperature
        self.model.eval()
        with self.autocast():
            logits, values = self.model(c.input_ids, c.attention_mask, c.start, temperature)
            logp = token_logprobs(logits, c.response)
            entropy = masked_mean(entropy_from_logits(logits), c.mask).item()
            del logits
            if self.ref_lm is None:
                with self.lm.disable_adapter():
                    h = self.model.hidden(c.input_ids, c.attention_mask, c.start)
            else:
                h = self.model.hidden(c.input_ids, c.attention_mask, c.start, lm=self.ref_lm)
            ref_logits = self.lm.get_output_embeddings()(h).float() / temperature if self.ref_lm is None \
                else self.ref_lm.get_output_embeddings()(h).float() / temperature
            ref_logp = token_logprobs(ref_logits, c.response)
        self.model.train()
        n = [len(r) for r in responses]
        return ([logp[i, :k].cpu() for i, k in enumerate(n)], [values[i, :k].float().cpu() for i, k in enumerate(n)],
                [ref_logp[i, :k].cpu() for i, k in enumerate(n)], entropy * sum(n))

    def rollout(self, step: int, times: dict[str, float]) -> tuple[Rollouts, list[ScoreResult]]:
        """Sample the step's responses chunk by chunk, sending each chunk for scoring at once; then the
        log-prob passes; then wait for the scores."""
        r = self.cfg.rollout
        idx = self.batch_indices(step)
        prompts = [self.prompt_ids[i] for i in idx]
        responses, ended, futures = [], [], []
        logp, values, ref_logp, entropy_sum = [], [], [], 0.0
        for start in range(0, len(idx), r.chunk_size):
            chunk = idx[start:start + r.chunk_size]
            t = time.perf_counter()
            with self.autocast():
                resp, end = generate(self.lm, [self.prompt_ids[i] for i in chunk], pad_id=self.pad_id, eos=self.eos,
                                     max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                     top_k=r.top_k, device=self.device)
            times["generate"] += time.perf_counter() - t
            pairs = [(self.prompt_for_server(self.rows[i]), self.response_text(x, e))
                     for i, x, e in zip(chunk, resp, end)]
            if r.overlap:
                futures.append(self.scorer.submit(pairs))
            else:
                t = time.perf_counter()
                done = cf.Future()
                done.set_result(self.scorer.score(pairs))
                futures.append(done)
                times["score_wait"] += time.perf_counter() - t
            responses += resp
            ended += end
        t = time.perf_counter()
        for start in range(0, len(idx), r.chunk_size):
            lp, v, ref, ent = self.forward_rollouts(prompts[start:start + r.chunk_size],
                                                    responses[start:start + r.chunk_size])
            logp += lp
            values += v
            ref_logp += ref
            entropy_sum += ent
        times["logprobs"] += time.perf_counter() - t
        t = time.perf_counter()
        results = [f.result() for f in futures]
        times["score_wait"] += time.perf_counter() - t
        longest = max(len(x) for x in responses)
        mask = pad_rows([torch.ones(len(x)) for x in responses], longest)
        ro = Rollouts(prompts, responses, ended, pad_rows(logp, longest), pad_rows(ref_logp, longest),
                      pad_rows(values, longest), mask, entropy_sum / mask.sum().item())
        return ro, results

    def score_and_advantage(self, ro: Rollouts, raw: torch.Tensor) -> dict[str, float]:
        """Shape the scores, add the KL penalty per token, compute GAE advantages and returns."""
        rc, k = self.cfg.reward, self.cfg.ppo
        scores = raw.clone()
        if rc.missing_eos_penalty:
            scores -= rc.missing_eos_penalty * (~torch.tensor(ro.ended)).float()
        if rc.whiten:
            scores = whiten(scores)
        if rc.clip:
            scores = scores.clamp(-rc.clip, rc.clip)
        kl = kl_estimate(ro.old_logp, ro.ref_logp, self.cfg.kl.estimator) * ro.mask  # (B, R)
        rewards = token_rewards(scores, kl, ro.mask, self.kl_ctl.value)
        adv, ro.returns = gae(rewards, ro.values, ro.mask, k.gamma, k.lam)
        ro.advantages = masked_whiten(adv, ro.mask) if k.whiten_advantages else adv
        k1 = (kl_estimate(ro.old_logp, ro.ref_logp, "k1") * ro.mask).sum(1)  # (B,) nats per response
        k3 = (kl_estimate(ro.old_logp, ro.ref_logp, "k3") * ro.mask).sum(1)
        return {"score_mean": raw.mean().item(), "score_std": raw.std().item() if len(raw) > 1 else 0.0,
                "reward_mean": rewards.sum(1).mean().item(), "kl": k1.mean().item(), "kl_k3": k3.mean().item(),
                "kl_coef": self.kl_ctl.value, "entropy": ro.entropy,
                "explained_variance": explained_variance(ro.values, ro.returns, ro.mask),
                "response_tokens": ro.mask.sum(1).mean().item(),
                "ended_fraction": sum(ro.ended) / len(ro.ended)}

    # -- 5: the update ------------------------------------------------------------------------
    def update(self, ro: Rollouts, step: int) -> dict[str, float]:
        """`ppo.epochs` passes over the rollouts in shuffled minibatches, one optimizer step each."""
        k, cfg = self.cfg.ppo, self.cfg
        n = len(ro.prompts)
        micro = k.minibatch_size // k.grad_accum
        sums: dict[str, float] = {}
        updates = 0
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.model.train()
        for epoch in range(k.epochs):
            g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1_009 + epoch)
            order = torch.randperm(n, generator=g).tolist()
            for mb in range(0, n, k.minibatch_size):
                rows = order[mb:mb + k.minibatch_size]
                for m in range(0, len(rows), micro):
                    stats = self.micro_step(ro, rows[m:m + micro], len(rows) // micro)
                    for key, v in stats.items():
                        sums[key] = sums.get(key, 0.0) + v / (len(rows) // micro)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip or float("inf")))
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
                sums["lr"] = self.scheduler.get_last_lr()[0]
                if not step_if_finite(self.optimizer, grad_norm):
                    self.skipped_steps += 1
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                updates += 1
        stats = {key: (v if key == "lr" else v / updates) for key, v in sums.items()}
        return {**stats, "skipped_steps": self.skipped_steps}

    def micro_step(self, ro: Rollouts, rows: list[int], count: int) -> dict[str, float]:
        """Forward + backward of one micro-batch (loss scaled by 1/count)."""
        k = self.cfg.ppo
        c = collate([ro.prompts[i] for i in rows], [ro.responses[i] for i in rows], self.pad_id, self.device)
        length = c.response.shape[1]

        def take(t: torch.Tensor) -> torch.Tensor:  # (B, R) rollout tensor → this micro-batch's (b, length)
            return t[rows, :length].to(self.device)

        old_logp, old_values, adv, returns = take(ro.old_logp), take(ro.values), take(ro.advantages), take(ro.returns)
        with self.autocast():
            logits, values = self.model(c.input_ids, c.attention_mask, c.start, self.cfg.rollout.temperature)
            logp = token_logprobs(logits, c.response)
            pg_loss, clip_frac = policy_loss(logp, old_logp, adv, c.mask, k.clip)
            vf_loss, vf_clip_frac = value_loss(values, old_values, returns, c.mask, k.value_clip)
            loss = pg_loss + k.value_coef * vf_loss
            if k.entropy_coef:
                loss = loss - k.entropy_coef * masked_mean(entropy_from_logits(logits), c.mask)
        (loss / count).backward()
        with torch.no_grad():
            approx_kl = masked_mean(0.5 * (logp - old_logp) ** 2, c.mask).item()
        return {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(), "clip_fraction": clip_frac.item(),
                "value_clip_fraction": vf_clip_frac.item(), "approx_kl": approx_kl}

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Run to `steps` (or `stop_at_step`); returns the last step's metrics (and the last gold reward)."""
        cfg = self.cfg
        self.scorer.wait_ready()
        stop = min(cfg.steps, cfg.stop_at_step or cfg.steps)
        bar = progress(cfg.steps, initial=self.step, enabled=cfg.log.progress, desc="grm-ppo")
        last: dict[str, Any] = {"step": self.step}
        if self.step == 0 and self.eval_rows:
            self.log_eval()
        while self.step < stop:
            start_rng = rng_state()  # a checkpoint written on a reward-service failure resumes from here
            times = {"generate": 0.0, "logprobs": 0.0, "score_wait": 0.0, "update": 0.0}
            t0 = time.perf_counter()
            # 1-4. rollouts, scored remotely (overlapped), rewards, advantages
            try:
                ro, results = self.rollout(self.step, times)
            except RewardServiceDown:
                if self.saved_step != self.step:
                    self.save_checkpoint(rng=start_rng)
                raise
            raw = torch.tensor([s for r in results for s in r.scores], dtype=torch.float32)
            stats = self.score_and_advantage(ro, raw)
            # 5. PPO epochs over minibatches
            t = time.perf_counter()
            stats.update(self.update(ro, self.step))
            times["update"] = time.perf_counter() - t
            # 6. KL controller, log, evaluate, checkpoint
            self.kl_ctl.update(stats["kl"], len(ro.prompts))
            self.step += 1
            step_s = time.perf_counter() - t0
            last = {"step": self.step, **stats, **{f"time_{k}_s": round(v, 4) for k, v in times.items()},
                    "time_step_s": round(step_s, 4), "score_wait_fraction": times["score_wait"] / step_s,
                    "score_retries": sum(r.retried for r in results)}
            self.metrics.write(last)
            bar.update(1)
            bar.set_postfix(score=f"{stats['score_mean']:.3f}", kl=f"{stats['kl']:.2f}")
            if self.eval_rows and (self.step % cfg.eval.every == 0 or self.step == cfg.steps):
                last.update({k: v for k, v in self.log_eval().items() if not k.endswith("_each")})
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < stop:
                self.save_checkpoint()
        bar.close()
        if self.saved_step != self.step:
            self.save_checkpoint()
        if self.step == cfg.steps and cfg.checkpoint.export_policy:
            self.export_policy(self.run_dir / "policy")
        return last

    # -- gold reward --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Gold reward (the benchmark's rule-based checker) of greedy and sampled responses to the
        held-out prompts; sampling from a fixed seed that leaves the run's RNG untouched."""
        from ..benchmark import gold_reward

        e, r = self.cfg.eval, self.cfg.rollout
        out: dict[str, float] = {}
        with torch.random.fork_rng(devices=[]), self.autocast():
            torch.manual_seed(e.seed)
            for mode, repeats in (("greedy", 1), ("sampled", e.samples)):
                golds, lengths = [], []
                for _ in range(repeats):
                    for s in range(0, len(self.eval_ids), e.batch_size):
                        resp, end = generate(self.lm, self.eval_ids[s:s + e.batch_size], pad_id=self.pad_id,
                                             eos=self.eos, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                             top_k=r.top_k, greedy=mode == "greedy", device=self.device)
                        for row, x, ended in zip(self.eval_rows[s:s + e.batch_size], resp, end):
                            text = self.tokenizer.decode(x, skip_special_tokens=True)
                            golds.append(gold_reward(row["constraints"], text))
                            lengths.append(len(x))
                g = torch.tensor(golds, dtype=torch.float64)
                out[f"gold_{mode}"] = g.mean().item()
                out[f"gold_{mode}_sem"] = (g.std() / math.sqrt(len(g))).item() if len(g) > 1 else 0.0
                out[f"response_tokens_{mode}"] = sum(lengths) / len(lengths)
                out[f"gold_{mode}_each"] = golds  # per prompt (and sample), in a fixed order: paired comparisons
        return out

    def log_eval(self) -> dict[str, Any]:
        t = time.perf_counter()
        stats = self.evaluate()
        self.metrics.write({"step": self.step, "split": "eval", "prompts": len(self.eval_rows), **stats,
                            "time_eval_s": round(time.perf_counter() - t, 3)})
        log.info("step %d: gold reward greedy %.3f ± %.3f, sampled %.3f ± %.3f", self.step, stats["gold_greedy"],
                 stats["gold_greedy_sem"], stats["gold_sampled"], stats["gold_sampled_sem"])
        return stats

    # -- checkpoints --------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}

    def save_checkpoint(self, rng: dict | None = None) -> Path:
        """Write `checkpoints/step-N/` atomically (temporary folder, then rename)."""
        from safetensors.torch import save_file

        final = self.ckpt_dir / checkpoint_name(self.step)
        with staged_dir(final) as tmp:
            save_file(self.trainable_state(), str(tmp / TRAINABLE_FILE))
            state = {"version": PPO_STATE_VERSION, "kind": "grm-ppo", "step": self.step,
                     "skipped_steps": self.skipped_steps,
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "kl": self.kl_ctl.state_dict(), "rng": rng if rng is not None else rng_state(),
                     "config": to_dict(self.cfg)}
            if self.cfg.precision.fp8:  # FP8 scaling state lives in buffers
                state["model"] = self.model.state_dict()
            torch.save(state, tmp / STATE_FILE)
        prune_checkpoints(self.ckpt_dir, self.cfg.checkpoint.keep)
        self.saved_step = self.step
        log.info("saved %s", final)
        return final

    def load_checkpoint(self, ckpt: Path) -> int:
        """Restore weights, optimizer, schedule, KL controller and RNG; returns the step to continue from."""
        from safetensors.torch import load_file

        from ..core.checkpoint import CheckpointError

        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        if state.get("kind") != "grm-ppo" or state.get("version") != PPO_STATE_VERSION:
            raise CheckpointError(f"{ckpt / STATE_FILE}: not a grm-ppo checkpoint of version {PPO_STATE_VERSION}")
        if "model" in state:
            self.model.load_state_dict(state["model"])
        weights = load_file(str(ckpt / TRAINABLE_FILE))
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if set(weights) != names:
            raise CheckpointError(f"{ckpt / TRAINABLE_FILE}: does not match this policy config (missing "
                                  f"{sorted(names - set(weights))[:4]}, unexpected {sorted(set(weights) - names)[:4]})")
        self.model.load_state_dict(weights, strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        set_rng_state(state["rng"])
        return int(state["step"])

    def export_policy(self, out: Path) -> Path:
        """The trained policy as a Hugging Face causal-LM folder (LoRA merged), written atomically."""
        lm = release_precision(copy.deepcopy(self.lm).cpu())  # fp8 modes: plain float32 layers again
        if self.ref_lm is None:
            lm = lm.merge_and_unload()
        with staged_dir(out) as tmp:
            with quiet_hf_progress():
                lm.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
            torch.save({k: v.cpu() for k, v in self.model.v_head.state_dict().items()}, tmp / "value_head.pt")
        return out

    def close(self) -> None:
        self.scorer.close()
