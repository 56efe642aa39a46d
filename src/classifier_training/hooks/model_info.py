"""Model size, compute and CPU latency at fit start: console table + ``model_info.json``.

* parameters (total, trainable) and size in MB = (parameter + buffer bytes) / 2**20;
* GFLOPs of one forward pass at batch 1 and the run's input size, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts 2 FLOPs, so GMACs is half);
* CPU latency of one image: median of a few timed forward passes after warm-up, eval mode,
  ``inference_mode``, with one thread per usable core (what onnxruntime uses by default), not the
  trainer's own thread count (``accelerate launch`` sets 1 on GPU machines); a rough deployment
  figure, not a benchmark.

Everything runs on an fp32 CPU copy in the default (contiguous) memory format, as deployed, so
the training model (device, mode, channels_last weights) is untouched.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch.utils.flop_counter import FlopCounterMode

from classifier_training.hooks.base import FitContext, Hook
from classifier_training.hooks.common import format_table
from classifier_training.io import atomic_write_json
from classifier_training.runtime import usable_cpus

LATENCY_RUNS = 7
"""Timed forward passes (after 2 warm-up passes); the median is reported."""


def model_info(model: torch.nn.Module, image_size: int, runs: int = LATENCY_RUNS) -> dict[str, Any]:
    """Parameter counts, size, FLOPs and CPU latency of ``model`` at ``image_size``."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    size_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    # a copy without Accelerate's autocast forward (mixed precision wraps model.forward): the
    # deployed model runs plain fp32, and stripping the wrapper from ``model`` would change
    # training
    net = extract_model_from_parallel(copy.deepcopy(model), keep_fp32_wrapper=False)
    net = net.float().cpu().eval().to(memory_format=torch.contiguous_format)
    x = torch.zeros(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(x)
    flops = int(counter.get_total_flops())
    times = []
    threads, trainer_threads = usable_cpus(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for i in range(runs + 2):
                start = time.perf_counter()
                net(x)
                if i >= 2:
                    times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(trainer_threads)
    return {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "total_params": total,
        "trainable_params": trainable,
        "size_mb": size_bytes / 2**20,
        "input_size": [1, 3, image_size, image_size],
        "gflops": flops / 1e9,
        "gmacs": flops / 2e9,
        "cpu_latency_ms": statistics.median(times) * 1e3,
        "cpu_latency_runs": runs,
        "cpu_threads": threads,
    }


class ModelInfoHook(Hook):
    """Prints the model's size/compute table and writes ``model_info.json``."""

    name = "model_info"

    def on_fit_start(self, ctx: FitContext) -> None:
        info = model_info(ctx.unwrapped_model(), ctx.recipe.data.image_size)
        info["arch"] = ctx.recipe.model.arch
        info["num_classes"] = len(ctx.class_names)
        atomic_write_json(ctx.run_dir / "model_info.json", info)
        rows = [
            ["architecture", info["arch"]],
            ["classes", info["num_classes"]],
            ["parameters", f"{info['total_params'] / 1e6:.2f} M"],
            ["trainable", f"{info['trainable_params'] / 1e6:.2f} M"],
            ["size", f"{info['size_mb']:.2f} MB"],
            ["compute", f"{info['gflops']:.3f} GFLOPs at {ctx.recipe.data.image_size} px"],
            ["CPU latency", f"{info['cpu_latency_ms']:.1f} ms/image ({info['cpu_threads']} thr)"],
        ]
        ctx.accelerator.print(format_table(["item", "value"], rows, title="Model information"))
        ctx.extra["model_info"] = info
