"""Class-conditional DDIM or DPM-Solver++ sampling (DDPMPipeline takes no class labels, so the loop is written here)."""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Tuple, Union

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
    (out, labels), = sample_jobs(unet, scheduler_or_cfg, [(None, class_counts, seed)], steps=steps,
                                 batch_size=batch_size, progress=progress, guidance_scale=guidance_scale,
                                 null_class=null_class, sampler=sampler)
    return out, labels


@torch.no_grad()
def sample_jobs(unet, scheduler_or_cfg, jobs: Sequence[Tuple[Optional[str], ClassCounts, int]], steps: int = 50,
                batch_size: int = 256, progress: bool = False, guidance_scale: float = 1.0,
                null_class: Optional[int] = None, sampler: str = "ddim") -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Several `sample` calls in shared UNet batches: job (adapter, class_counts, seed) draws its own start noise
    from its own seed and runs every row through its own adapter (adapters.routed; None: the UNet as it is
    routed now, i.e. the active adapter or none). Each job's images equal a lone `sample(..., seed=seed)` with
    that adapter active, up to float rounding (batched convolutions). Returns one (images, labels) per job."""
    from .adapters import BASE, routed

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sample: steps must be an integer >= 1, got {steps!r}")
    if batch_size < 1:
        raise ValueError(f"sample: batch_size must be >= 1, got {batch_size!r}")
    null = _null_label(unet, scheduler_or_cfg, guidance_scale, null_class)
    cfg = unet.config
    is_cfg = isinstance(scheduler_or_cfg, GeneratorConfig)
    num_classes = scheduler_or_cfg.num_classes if is_cfg else cfg.num_class_embeds
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    per_job = [labels_for_counts(counts, num_classes) for _, counts, _ in jobs]
    noise = torch.cat([torch.randn((len(y), *image_shape_of(cfg)), generator=torch.Generator().manual_seed(int(seed)))
                       for y, (_, _, seed) in zip(per_job, jobs)]) if jobs else torch.empty(0)
    labels = torch.cat(per_job) if jobs else torch.empty(0, dtype=torch.int64)
    adapters = [a for y, (a, _, _) in zip(per_job, jobs) for _ in range(len(y))]
    mixed = any(a is not None for a in adapters) and len(set(adapters)) > 1
    if mixed and None in adapters:
        from .adapters import active_adapter
        current = active_adapter(unet) or BASE
        adapters = [current if a is None else a for a in adapters]
    out = torch.empty(noise.shape)
    sched = build_sample_scheduler(scheduler_or_cfg, sampler)
    was_training = unet.training
    unet.eval()
    try:
        batches = range(0, len(labels), batch_size)
        for start in tqdm(batches, desc="sample", disable=not progress, leave=False):
            x = noise[start:start + batch_size].to(device, dtype)
            y = labels[start:start + batch_size].to(device)
            names = adapters[start:start + batch_size]
            if null is not None:
                y_both = torch.cat([y, torch.full_like(y, null)])
                names = names + names
            sched.set_timesteps(steps)  # per batch: resets DPM-Solver's multistep history (DDIM keeps none)
            route = routed(unet, names) if mixed else _same_adapter(unet, names[0] if names else None)
            with route:
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
    bounds = torch.tensor([0] + [len(y) for y in per_job]).cumsum(0).tolist()
    return [(out[a:b], labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _same_adapter(unet, name: Optional[str]):
    """Every row through one adapter (BASE: none; None: as routed now): PEFT's ordinary path, no per-row routing."""
    import contextlib

    from .adapters import BASE, adapters_disabled, using_adapter

    if name is None:
        return contextlib.nullcontext()
    return adapters_disabled(unet) if name == BASE else using_adapter(unet, name)
