"""Class-conditional DDIM sampling (DDPMPipeline takes no class labels, so the loop is written here)."""
from __future__ import annotations

from typing import Mapping, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from .config import GeneratorConfig
from .unet import build_sample_scheduler

ClassCounts = Union[Sequence[int], Mapping[int, int]]


def labels_for_counts(class_counts: ClassCounts, num_classes: int) -> torch.Tensor:
    """Expand per-class counts (list indexed by class, or {class: count}) into a sorted label vector."""
    items = class_counts.items() if isinstance(class_counts, Mapping) else enumerate(class_counts)
    labels = []
    for c, n in items:
        c, n = int(c), int(n)
        if not 0 <= c < num_classes:
            raise ValueError(f"class_counts: class {c} outside 0..{num_classes - 1}")
        if n < 0:
            raise ValueError(f"class_counts: count for class {c} must be >= 0, got {n}")
        labels += [c] * n
    return torch.tensor(sorted(labels), dtype=torch.int64)


@torch.no_grad()
def sample(unet, scheduler_or_cfg, class_counts: ClassCounts, steps: int = 50, seed: int = 0,
           batch_size: int = 256, progress: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw images for the given class counts with the UNet's currently active adapter (if any).

    Returns (images float32 (N, C, H, W) in [0, 1], labels int64 (N,)), grouped by class. All starting noise comes
    from one torch.Generator seeded with `seed` and DDIM runs with eta=0: a seed and batch size give bit-identical
    images, and another batch size the same images up to float rounding (batched convolutions).
    `scheduler_or_cfg`: the model's GeneratorConfig or any diffusers scheduler sharing its noise schedule.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sample: steps must be an integer >= 1, got {steps!r}")
    if batch_size < 1:
        raise ValueError(f"sample: batch_size must be >= 1, got {batch_size!r}")
    cfg = unet.config
    is_cfg = isinstance(scheduler_or_cfg, GeneratorConfig)
    labels = labels_for_counts(class_counts, scheduler_or_cfg.num_classes if is_cfg else cfg.num_class_embeds)
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    shape = (len(labels), cfg.in_channels, cfg.sample_size, cfg.sample_size)
    noise = torch.randn(shape, generator=gen)
    out = torch.empty(shape)
    was_training = unet.training
    unet.eval()
    try:
        batches = range(0, len(labels), batch_size)
        for start in tqdm(batches, desc="sample", disable=not progress, leave=False):
            sched = build_sample_scheduler(scheduler_or_cfg)
            sched.set_timesteps(steps)
            x = noise[start:start + batch_size].to(device, dtype)
            y = labels[start:start + batch_size].to(device)
            for t in sched.timesteps:
                eps = unet(x, t, class_labels=y).sample
                x = sched.step(eps, t, x).prev_sample  # eta=0: deterministic given the start noise
            out[start:start + batch_size] = ((x.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
    finally:
        unet.train(was_training)
    return out, labels
