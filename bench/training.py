"""Training throughput of the default model: contrastive steps of ChartCLIP-S-hybrid in fp32 and in mixed precision.

    python bench/training.py [--batch 64] [--steps 12] [--threads N] [--json out.json]

One step is what pre-training does per batch with the text tower locked (its caption embeddings are computed once,
vlm_assets.training): the image tower forward and backward on a batch of rendered charts, a symmetric contrastive
loss against the batch's caption embeddings, and an AdamW update. Measured with autocast off (fp32) and with the
pipeline's mixed precision (bf16 autocast on CPU, AMP on CUDA), after two warm-up steps each; reports samples per
second and the speed-up. Chart rendering is not in the step (bench/render.py measures it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from a checkout

from bench.common import machine_info, synthetic_bars  # noqa: E402


def samples_per_second(precision: str, batch: int, steps: int, device: str) -> float:
    import torch

    from vlm_assets.model import create
    from vlm_assets.rendering import render_chart
    from vlm_assets.serving.requests import parse_bars
    from vlm_assets.training import autocast_context, autocast_dtype

    clip = create(device=device, seed=0)
    model = clip.model.train()
    params = [p for p in model.visual.parameters() if p.requires_grad] + [model.logit_scale]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    charts = [render_chart(parse_bars(synthetic_bars(100, seed=i))) for i in range(batch)]
    pixels = clip._pixels_at_input_size(charts).to(device)
    with torch.no_grad():
        captions = torch.nn.functional.normalize(torch.randn(batch, clip.embed_dim, device=device), dim=-1)
    target = torch.arange(batch, device=device)
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype(device, precision) == torch.float16)

    def step() -> None:
        with autocast_context(device, precision):
            images = model.encode_image(pixels, normalize=True)
            logits = model.logit_scale.exp() * images.float() @ captions.T
            loss = (torch.nn.functional.cross_entropy(logits, target)
                    + torch.nn.functional.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(2):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=0, help="0 = every usable core")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)

    import torch

    from vlm_assets.training import autocast_dtype
    from vlm_assets.model import resolve_device

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    device = resolve_device(args.device)
    fp32 = samples_per_second("fp32", args.batch, args.steps, device)
    mixed = samples_per_second("auto", args.batch, args.steps, device)
    report = {"device": device, "threads": torch.get_num_threads(), "batch": args.batch, "steps": args.steps,
              "mixed_precision": str(autocast_dtype(device, "auto")).replace("torch.", ""),
              "fp32_samples_per_s": fp32, "mixed_samples_per_s": mixed, "speedup": mixed / fp32,
              "machine": machine_info(),
              "command": "python bench/training.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(report, indent=2))
    print()
    print(f"{'fp32 samples/s':32s} {fp32:.1f}")
    print(f"{report['mixed_precision'] + ' autocast samples/s':32s} {mixed:.1f}   (x{mixed / fp32:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
