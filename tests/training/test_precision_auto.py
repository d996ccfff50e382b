"""`auto` precision picks the dtype whose matmuls are fast on the device (training and serving alike)."""

import torch

from grmserve.server.engine.runner import resolve_precision
from grmserve.training.config import PrecisionConfig
from grmserve.training.core.devices import fast_dtype
from grmserve.training.precision import apply_precision


def test_auto_precision_follows_the_hardware():
    cpu = torch.device("cpu")
    native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert fast_dtype(cpu) == (torch.bfloat16 if native_bf16 else torch.float32)
    assert fast_dtype(torch.device("cuda")) == torch.bfloat16
    plan = apply_precision(torch.nn.Linear(4, 4), lambda m: torch.optim.SGD(m.parameters(), 0.1),
                           PrecisionConfig(mode="auto"), device=cpu)
    assert plan.mode == ("bf16" if native_bf16 else "fp32")
    assert resolve_precision("auto", cpu) == ("bf16" if native_bf16 else "fp32")
    assert resolve_precision("fp8", cpu) == "fp8"
