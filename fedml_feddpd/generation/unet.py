"""Factory of the server's class-conditional UNet and its schedulers."""
from __future__ import annotations

import json
import os
from typing import Union

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from diffusers.loaders.peft import PeftAdapterMixin

from .config import SAMPLERS, GeneratorConfig, image_shape_of


class GeneratorUNet(UNet2DModel, PeftAdapterMixin):
    """UNet2DModel with diffusers' PEFT mixin, which UNet2DModel itself lacks (add/set/disable/save LoRA adapters)."""


def build_unet(cfg: GeneratorConfig) -> GeneratorUNet:
    """A fresh class-conditional UNet; label `cfg.num_classes` is the null class used by label dropout."""
    n = len(cfg.block_out_channels)
    return GeneratorUNet(
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (n - 1),
        up_block_types=("AttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        attention_head_dim=cfg.attention_head_dim,
        num_class_embeds=cfg.num_classes + 1,
    )


def build_train_scheduler(cfg: GeneratorConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.train_timesteps, beta_schedule=cfg.beta_schedule)


def build_sample_scheduler(cfg_or_scheduler: Union[GeneratorConfig, DDPMScheduler, DDIMScheduler],
                           sampler: str = "ddim"):
    """DDIM (or "dpm": DPM-Solver++, order 2) sharing the training noise schedule (a config or any diffusers
    scheduler of the same model)."""
    if isinstance(cfg_or_scheduler, GeneratorConfig):
        cfg_or_scheduler = build_train_scheduler(cfg_or_scheduler)
    if sampler == "dpm":
        # DDIM clips each step's predicted x0 to [-1, 1] (the training config's clip_sample, on by default);
        # diffusers' DPM-Solver++ has no clip_sample, but its thresholding with sample_max_value 1 is that clip:
        # s = clamp(quantile(|x0|), 1, 1) = 1 (another clip_sample_range gets dynamic thresholding up to it).
        # Without it, digits samples judged 6 points worse at 10 and 15 steps alike (validate_sampler_digits.yaml).
        config = cfg_or_scheduler.config
        clip = dict(thresholding=True, sample_max_value=config.get("clip_sample_range", 1.0)) \
            if config.get("clip_sample", False) else {}
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2, **clip)
    if sampler != "ddim":
        raise ValueError(f"generator.sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
    return DDIMScheduler.from_config(cfg_or_scheduler.config)


def _pretrained_layout(path: str):
    """(UNet folder, scheduler config file or None) of a UNet folder or a diffusers pipeline folder (unet/)."""
    folder = os.path.expanduser(path)
    if os.path.isfile(os.path.join(folder, "unet", "config.json")):
        return os.path.join(folder, "unet"), os.path.join(folder, "scheduler", "scheduler_config.json")
    return folder, os.path.join(folder, "scheduler_config.json")


def load_unet(path: str) -> GeneratorUNet:
    """Load a local diffusers UNet2DModel (UNet or pipeline folder; no download) as a LoRA-capable GeneratorUNet."""
    folder, _ = _pretrained_layout(path)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"generator.pretrained: {path!r} is not a local diffusers model folder (no config.json)")
    try:
        return GeneratorUNet.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # diffusers raises several types for unreadable folders; report them uniformly
        raise ValueError(f"generator.pretrained: cannot load a UNet2DModel from {path!r}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


def load_train_scheduler(path: str, cfg: GeneratorConfig) -> DDPMScheduler:
    """The noise schedule a pretrained UNet was trained with, if the folder ships one; else the config's."""
    _, sched_file = _pretrained_layout(path)
    if not os.path.isfile(sched_file):
        return build_train_scheduler(cfg)
    with open(sched_file) as f:
        return DDPMScheduler.from_config(json.load(f))


def check_matches(unet: UNet2DModel, cfg: GeneratorConfig) -> None:
    """Raise ValueError if a loaded UNet cannot serve this config (image shape, class count)."""
    c = unet.config
    problems = []
    if image_shape_of(c)[1:] != cfg.image_shape[1:]:
        problems.append(f"image size {'x'.join(map(str, image_shape_of(c)[1:]))} != "
                        f"{'x'.join(map(str, cfg.image_shape[1:]))}")
    if c.in_channels != cfg.in_channels or c.out_channels != cfg.in_channels:
        problems.append(f"channels {c.in_channels}->{c.out_channels} != {cfg.in_channels}")
    if c.num_class_embeds is None or c.num_class_embeds < cfg.num_classes:
        problems.append(f"num_class_embeds {c.num_class_embeds} < num_classes {cfg.num_classes}")
    if problems:
        raise ValueError("generator.pretrained: model does not fit the generator config: " + "; ".join(problems))
