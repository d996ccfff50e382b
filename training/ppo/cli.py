"""`grm-ppo`: PPO whose rollouts are scored by a remote grm-serve.

    $ grm-serve --server.port 50051 &                              # the default GRM
    $ grm-ppo --reward.address localhost:50051                     # SmolLM2 + LoRA (preset smollm2)
    $ grm-ppo --preset tiny --reward.address localhost:50051       # CPU, seconds
    $ grm-ppo ... --resume                                         # continue the newest checkpoint

Exit status: 0 done; 2 bad config or input; 3 the reward service was unreachable (at start-up, or
for longer than `reward.patience_s`; a checkpoint of the last completed step is kept); 4 the reward
service answered with unusable scores.
"""

from __future__ import annotations

import json
import sys

from ..benchmark import BenchmarkError
from ..core import assets
from ..core.checkpoint import CheckpointError
from ..core.configtools import fail, interrupted, resume_hint, start_command
from ..trainer import latest_checkpoint
from .presets import parse_args
from .rollout import RewardServiceDown, ScoreError
from .trainer import PPOTrainer

SERVICE_DOWN = 3
BAD_SCORES = 4


def main(argv: list[str] | None = None) -> int:
    cfg, ns = parse_args(argv)
    if not start_command(cfg, ns):
        return 0
    try:
        trainer = PPOTrainer(cfg)
    except (ValueError, CheckpointError, BenchmarkError, assets.AssetError) as exc:
        return fail("grm-ppo", exc)
    except KeyboardInterrupt:  # Ctrl-C while loading the policy, reference and prompts
        return interrupted("grm-ppo", "before the first step; nothing was trained")
    try:
        result = trainer.fit()
        print(json.dumps(result))
        return 0
    except KeyboardInterrupt:
        return interrupted("grm-ppo", resume_hint(trainer.step, trainer.saved_step, trainer.ckpt_dir))
    except (RewardServiceDown, TimeoutError) as exc:
        kept = latest_checkpoint(trainer.ckpt_dir)
        where = f"the last checkpoint is {kept}; continue with --resume" if kept else "no checkpoint was written yet"
        print(f"grm-ppo: {exc}; {where}", file=sys.stderr)
        return SERVICE_DOWN
    except ScoreError as exc:
        print(f"grm-ppo: {exc}", file=sys.stderr)
        return BAD_SCORES
    finally:
        trainer.close()


if __name__ == "__main__":
    raise SystemExit(main())
