"""Does grm-serve serve an FP8-trained GRM as it was trained? Preference agreement between the
training code's evaluation of an FP8-trained configuration (grm-experiment's own test scores:
FP8TrainingLinear layers, inputs and weights rounded to E4M3 per tensor, on the cached lower layers)
and grm-serve serving the checkpoint built from that configuration's artifact (the same E4M3 weight
bytes in FP8InferenceLinear layers; activations are not rounded on CPU). Prints one JSON object.

    $ python bench/fp8_train_agreement.py --experiment runs/exp-fp32-full \\
          --config grm-dpo-noref-noise0.00-alpha0.1-fp8-o2 --pairs 500          # the default model

Only pairs that fit the experiment's token limit untruncated are compared (the experiment truncates
a pair jointly, the server each sequence), so both sides score the same tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from machine import cpu_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", required=True, help="grm-experiment output folder")
    p.add_argument("--config", required=True, help="the FP8-trained configuration's name")
    p.add_argument("--checkpoint", default="", help="served checkpoint (default: the embedded default model)")
    p.add_argument("--pairs", type=int, default=500)
    p.add_argument("--max-tokens", type=int, default=256, help="the experiment's --max_tokens")
    p.add_argument("--compute", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the server's compute dtype around the FP8 weights (auto: the device's fast dtype)")
    args = p.parse_args()

    from grmserve.server.background import ServerThread
    from grmserve.server.config import local
    from grmserve.training.benchmark import load_split
    from grmserve.training.core.checkpoint import load_grm
    from grmserve.training.core.default_model import ensure_default_model
    from grmserve.training.core.prompts import PromptRenderer
    from grmserve.training.data import DataReport, encode_pairs, read_pairs

    result = json.loads((Path(args.experiment) / "results" / f"{args.config}.json").read_text())
    trained = result["test_id_pair_scores"]
    checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_default_model()
    tok = load_grm(checkpoint, load_tokenizer=True).tokenizer
    pairs, _ = read_pairs(load_split("test_id"))
    enc = encode_pairs(pairs, PromptRenderer(tok), DataReport(source="test_id"), max_tokens=args.max_tokens)
    assert len(enc) == len(trained), "the experiment's test_id pairs and these differ; same data and max tokens?"
    chosen = [i for i, e in enumerate(enc) if not e.truncated][: args.pairs]
    cfg = local()
    cfg.model.checkpoint = str(checkpoint)
    cfg.model.precision = args.compute
    with ServerThread(cfg) as server, server.client(timeout=600) as client:
        info = client.info()
        served = []
        for start in range(0, len(chosen), 32):
            batch = [pairs[i] for i in chosen[start:start + 32]]
            flat = client.score([(q.prompt, r) for q in batch for r in (q.chosen, q.rejected)])
            served += [flat[k:k + 2] for k in range(0, len(flat), 2)]
    t = torch.tensor([trained[i] for i in chosen])  # (N, 2)
    s = torch.tensor(served)  # (N, 2)
    mt, ms = t[:, 0] - t[:, 1], s[:, 0] - s[:, 1]
    agree = ((mt > 0) == (ms > 0)).float()
    print(json.dumps({
        "cpu": cpu_model(), "checkpoint": str(checkpoint), "config": args.config,
        "served_precision": info.precision, "compute": args.compute, "pairs": len(chosen),
        "agreement": round(float(agree.mean()), 4), "flips": int((1 - agree).sum()),
        "margin_pearson": round(float(torch.corrcoef(torch.stack([mt, ms]))[0, 1]), 5),
        "margin_abs_error_mean": round(float((mt - ms).abs().mean()), 5),
        "accuracy_training_code": round(float((mt > 0).float().mean()), 4),
        "accuracy_served": round(float((ms > 0).float().mean()), 4)}, indent=1))


if __name__ == "__main__":
    main()
