"""Settings of the server's generator and of the per-client Diffusion-DPO step.

Field names mirror the YAML keys (`generator:` and `dpo_args:`) so the config loader can pass sections
through unchanged; every check raises a one-line ValueError naming the YAML path of the field.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple, Union

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
LOSS_TYPES = ("sigmoid", "hinge", "ipo")
SAMPLERS = ("ddim", "dpm")  # diffusers' DDIMScheduler; DPMSolverMultistepScheduler (DPM-Solver++, order 2)
# Module names of UNet2DModel that PEFT's LoRA can wrap (attention projections and resnet convs).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "time_emb_proj", "conv1", "conv2", "conv_shortcut")


def _int(prefix: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{prefix}.{name}: expected an integer >= {minimum}, got {value!r}")


def _positive(prefix: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{prefix}.{name}: expected a number > 0, got {value!r}")


def _unit(prefix: str, name: str, value, closed_top: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and 0.0 <= value and (value <= 1.0 if closed_top else value < 1.0)
    if not ok:
        bracket = "]" if closed_top else ")"
        raise ValueError(f"{prefix}.{name}: expected a number in [0, 1{bracket}, got {value!r}")


def _choice(prefix: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{prefix}.{name}: expected one of {', '.join(allowed)}, got {value!r}")


def check_guidance_scale(name: str, value) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 1
    if not ok:
        raise ValueError(f"{name}: expected a finite number >= 1 (1 = no classifier-free guidance), got {value!r}")


@dataclass
class GeneratorConfig:
    """Class-conditional diffusers UNet and its schedulers. The dataclass defaults fit 8x8 digits; a run's
    config takes the image shape and classes from its dataset and the sizes from shape_defaults
    (`for_data`), and every field can still be set under `generator:`."""

    num_classes: int = 10
    sample_size: Union[int, List[int]] = 8   # H (square) or [H, W]
    in_channels: int = 1
    block_out_channels: Tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention_head_dim: int = 16
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    pretrain_steps: int = 600   # 8x8 digits: chosen on validation data (CHANGELOG.md, 0.1.0)
    pretrain_batch_size: int = 128
    pretrain_lr: float = 2e-3
    ema_decay: float = 0.995
    label_dropout: float = 0.1
    sample_steps: int = 50
    sampler: str = "ddim"  # how pool and supplements are sampled (SAMPLERS); sampling-only, not in the cache key
    # Classifier-free guidance at sampling: eps_null + w * (eps_class - eps_null), w >= 1; 1 = off (one UNet pass per
    # step, as before); w != 1 needs the null class that label_dropout > 0 trains and costs 2 passes per step.
    # Sampling-only: not in the cache key. 1.5 chosen on validation data (CHANGELOG.md, 0.1.0).
    guidance_scale: float = 1.5
    pretrained: Optional[str] = None
    cache_dir: str = "~/.cache/fedml_feddpd/generators"

    def __post_init__(self):
        p = "generator"
        self.sample_size = _check_size(self.sample_size)
        for name, minimum in (("num_classes", 1), ("in_channels", 1), ("layers_per_block", 1),
                              ("norm_num_groups", 1), ("attention_head_dim", 1), ("train_timesteps", 2),
                              ("pretrain_steps", 0), ("pretrain_batch_size", 1), ("sample_steps", 1)):
            _int(p, name, getattr(self, name), minimum)
        if isinstance(self.block_out_channels, (str, bytes)) or not hasattr(self.block_out_channels, "__iter__"):
            raise ValueError(f"{p}.block_out_channels: expected a list of integers, got {self.block_out_channels!r}")
        self.block_out_channels = tuple(self.block_out_channels)
        chans = self.block_out_channels
        if not chans or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 or c % self.norm_num_groups
                            or c % self.attention_head_dim for c in chans):
            raise ValueError(f"{p}.block_out_channels: expected a non-empty list of integers divisible by "
                             f"norm_num_groups ({self.norm_num_groups}) and attention_head_dim "
                             f"({self.attention_head_dim}), got {list(chans)!r}")
        if any(side % (2 ** (len(chans) - 1)) for side in self.image_shape[1:]):
            raise ValueError(f"{p}.block_out_channels: {len(chans)} blocks halve the image {len(chans) - 1} times, so "
                             f"height and width must be multiples of {2 ** (len(chans) - 1)}; got "
                             f"{'x'.join(map(str, self.image_shape[1:]))} (use fewer blocks)")
        if self.sample_steps > self.train_timesteps:
            raise ValueError(f"{p}.sample_steps: expected an integer <= train_timesteps "
                             f"({self.train_timesteps}), got {self.sample_steps}")
        _choice(p, "beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _choice(p, "sampler", self.sampler, SAMPLERS)
        _positive(p, "pretrain_lr", self.pretrain_lr)
        _unit(p, "ema_decay", self.ema_decay, closed_top=False)
        _unit(p, "label_dropout", self.label_dropout, closed_top=False)
        check_guidance_scale(f"{p}.guidance_scale", self.guidance_scale)
        if self.guidance_scale != 1 and self.label_dropout == 0:
            raise ValueError(f"{p}.guidance_scale: expected 1 when label_dropout is 0 (no null class is trained to "
                             f"guide with; the default is 1.5), got {self.guidance_scale!r}")
        if self.pretrained is not None and (not isinstance(self.pretrained, str) or not self.pretrained):
            raise ValueError(f"{p}.pretrained: expected a path to a local diffusers UNet folder or null, "
                             f"got {self.pretrained!r}")
        if not isinstance(self.cache_dir, str) or not self.cache_dir:
            raise ValueError(f"{p}.cache_dir: expected a non-empty path, got {self.cache_dir!r}")

    @classmethod
    def for_data(cls, shape, classes: int, **given) -> "GeneratorConfig":
        """The config for images of `shape` (C, H, W) in `classes` classes: sizes from shape_defaults, then the
        keys the YAML sets. A YAML value for a key the data decides must agree with the data."""
        c, h, w = shape
        data = {"num_classes": classes, "in_channels": c, "sample_size": h if h == w else [h, w]}
        for key, value in data.items():
            norm = _check_size if key == "sample_size" else (lambda v: v)
            if key in given and norm(given[key]) != norm(value):
                raise ValueError(f"generator.{key}: the dataset's images are {c}x{h}x{w} in {classes} classes, "
                                 f"so expected {value!r} (or leave it out), got {given[key]!r}")
        return cls(**{**shape_defaults(h, w), **data, **given})

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of the images it generates."""
        return image_shape_of(self)

    @property
    def null_class(self) -> int:
        """Label used for label dropout (unconditional); the UNet embeds num_classes + 1 labels."""
        return self.num_classes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        if not isinstance(self.sample_size, int):
            d["sample_size"] = list(self.sample_size)
        return d


def shape_defaults(height: int, width: int) -> dict:
    """Generator sizes per image size, chosen for 2 CPU cores (docs/DESIGN.md, "The generator"): 8x8 digits
    keep the two-block UNet; 28x28 and 32x32 get three narrow blocks (0.7 M parameters, ~0.6 s per batch-128
    training step and ~640 image-steps/s of sampling at 28x28 on 2 cores)."""
    if max(height, width) <= 16:
        return {"block_out_channels": (32, 64), "pretrain_steps": 600}
    return {"block_out_channels": (16, 32, 64), "pretrain_steps": 2000}


def image_shape_of(unet_config) -> Tuple[int, int, int]:
    """(C, H, W) a diffusers UNet2DModel config or a GeneratorConfig generates (sample_size: an int or [H, W])."""
    size = unet_config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    return unet_config.in_channels, int(h), int(w)


def _check_size(size):
    """sample_size: a positive int (square) or [H, W] of positive ints; a square [H, H] becomes H."""
    ok_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
    if ok_int(size):
        return size
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(ok_int(v) for v in size):
        return size[0] if size[0] == size[1] else [int(size[0]), int(size[1])]
    raise ValueError(f"generator.sample_size: expected a positive integer or [height, width], got {size!r}")


@dataclass
class DPOSettings:
    """Hyperparameters of one client's Diffusion-DPO adapter (mapped onto a trl.DPOConfig)."""

    beta: float = 2000.0
    loss_type: str = "sigmoid"
    learning_rate: float = 3e-4
    max_steps: int = 10
    batch_size: int = 16
    lora_rank: int = 4
    lora_alpha: float = 4
    target_modules: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    seed: int = 0
    # continue a client's adapter from its last round's weights (checkpoints keep them) instead of a fresh one;
    # with 10 steps a round, chosen on validation data (CHANGELOG.md, 0.1.0)
    warm_start: bool = True

    def __post_init__(self):
        p = "dpo_args"
        if not isinstance(self.warm_start, bool):
            raise ValueError(f"{p}.warm_start: expected true or false, got {self.warm_start!r}")
        _positive(p, "beta", self.beta)
        _choice(p, "loss_type", self.loss_type, LOSS_TYPES)
        _positive(p, "learning_rate", self.learning_rate)
        _int(p, "max_steps", self.max_steps, 1)
        _int(p, "batch_size", self.batch_size, 1)
        _int(p, "lora_rank", self.lora_rank, 1)
        _positive(p, "lora_alpha", self.lora_alpha)
        _int(p, "seed", self.seed, 0)
        targets = self.target_modules
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets \
                or any(t not in LORA_TARGETS for t in targets):
            raise ValueError(f"{p}.target_modules: expected a non-empty list drawn from "
                             f"{', '.join(LORA_TARGETS)}, got {targets!r}")
        self.target_modules = list(targets)
