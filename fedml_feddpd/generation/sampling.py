"""Class-conditional DDIM or DPM-Solver++ sampling (DDPMPipeline takes no class labels, so the loop is written here)."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from .config import GeneratorConfig, check_guidance_scale, image_shape_of
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


def _null_label(unet, scheduler_or_cfg, guidance_scale, null_class: Optional[int]) -> Optional[int]:
    """The label of the unconditional pass, or None when guidance is off (guidance_scale == 1)."""
    check_guidance_scale("sample: guidance_scale", guidance_scale)
    if guidance_scale == 1:
        return None
    if isinstance(scheduler_or_cfg, GeneratorConfig):
        if scheduler_or_cfg.label_dropout == 0:
            raise ValueError(f"sample: guidance_scale {guidance_scale!r} needs the null class that label dropout "
                             "trains, but the generator was pretrained with label_dropout 0; expected guidance_scale 1")
        if null_class is None:
            null_class = scheduler_or_cfg.null_class
    if null_class is None:
        raise ValueError(f"sample: guidance_scale {guidance_scale!r} needs null_class (ServerGenerator.null_class: "
                         "the label trained by label_dropout > 0), got None; expected guidance_scale 1 without one")
    embeds = unet.config.num_class_embeds
    if isinstance(null_class, bool) or not isinstance(null_class, int) or embeds is None \
            or not 0 <= null_class < embeds:
        raise ValueError(f"sample: null_class must be a label of the UNet (0..{(embeds or 0) - 1}), got {null_class!r}")
    return null_class


@torch.no_grad()
def sample(unet, scheduler_or_cfg, class_counts: ClassCounts, steps: int = 50, seed: int = 0,
           batch_size: int = 256, progress: bool = False, guidance_scale: float = 1.0,
           null_class: Optional[int] = None, sampler: str = "ddim") -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw images for the given class counts with the UNet's currently active adapter (if any).

    Returns (images float32 (N, C, H, W) in [0, 1], labels int64 (N,)), grouped by class. All starting noise comes
    from one torch.Generator seeded with `seed` and DDIM runs with eta=0: a seed and batch size give bit-identical
    images, and another batch size the same images up to float rounding (batched convolutions).
    `scheduler_or_cfg`: the model's GeneratorConfig or any diffusers scheduler sharing its noise schedule.
    `guidance_scale` w: classifier-free guidance eps = eps(null) + w * (eps(class) - eps(null)), both in one batched
    UNet call per step (twice the cost); w == 1 skips the null pass and is exactly unguided sampling. w != 1 needs the
    null class trained by label_dropout > 0: taken from a GeneratorConfig, else pass `null_class`
    (ServerGenerator.null_class). `sampler`: "ddim" or "dpm" (diffusers' DPMSolverMultistepScheduler, DPM-Solver++
    of order 2, deterministic; fewer steps for the same quality).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sample: steps must be an integer >= 1, got {steps!r}")
    if batch_size < 1:
        raise ValueError(f"sample: batch_size must be >= 1, got {batch_size!r}")
    null = _null_label(unet, scheduler_or_cfg, guidance_scale, null_class)
    cfg = unet.config
    is_cfg = isinstance(scheduler_or_cfg, GeneratorConfig)
    labels = labels_for_counts(class_counts, scheduler_or_cfg.num_classes if is_cfg else cfg.num_class_embeds)
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    shape = (len(labels), *image_shape_of(cfg))
    noise = torch.randn(shape, generator=gen)
    out = torch.empty(shape)
    sched = build_sample_scheduler(scheduler_or_cfg, sampler)
    was_training = unet.training
    unet.eval()
    try:
        batches = range(0, len(labels), batch_size)
        for start in tqdm(batches, desc="sample", disable=not progress, leave=False):
            x = noise[start:start + batch_size].to(device, dtype)
            y = labels[start:start + batch_size].to(device)
            if null is not None:
                y_both = torch.cat([y, torch.full_like(y, null)])
            sched.set_timesteps(steps)  # per batch: resets DPM-Solver's multistep history (DDIM keeps none)
            for t in sched.timesteps:
                if null is None:
                    eps = unet(x, t, class_labels=y).sample
                else:
                    eps_cond, eps_null = unet(torch.cat([x, x]), t, class_labels=y_both).sample.chunk(2)
                    eps = eps_null + guidance_scale * (eps_cond - eps_null)
                x = sched.step(eps, t, x).prev_sample  # eta=0: deterministic given the start noise
            out[start:start + batch_size] = ((x.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
    finally:
        unet.train(was_training)
    return out, labels
