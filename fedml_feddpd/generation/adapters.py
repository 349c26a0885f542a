"""Per-client LoRA adapters on the generator UNet (PEFT through diffusers' PeftAdapterMixin).

One UNet holds every client's adapter by name; the frozen base is the same UNet with adapters disabled, so no
second copy of the model ever exists.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
import zlib
from typing import Dict, Iterator, List, Tuple

import torch
from diffusers.loaders.peft import PeftAdapterMixin
from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.model import _adapter_names_pre_forward_hook
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from .config import DPOSettings

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def _require_mixin(unet) -> None:
    if not isinstance(unet, PeftAdapterMixin):
        raise TypeError(f"{type(unet).__name__} cannot hold LoRA adapters; build it with "
                        "fedml_feddpd.generation.build_unet/load_unet (GeneratorUNet)")


def adapter_names(unet) -> List[str]:
    return list(getattr(unet, "peft_config", {}) or {})


def has_adapter(unet, name: str) -> bool:
    return name in adapter_names(unet)


def _require(unet, name: str) -> None:
    if not has_adapter(unet, name):
        raise KeyError(f"no adapter named {name!r} on the generator (have: {adapter_names(unet)})")


@contextlib.contextmanager
def _quiet(*logger_names: str):
    """Mute diffusers loggers whose warnings are wrong here (the caller checks the result itself)."""
    logs = [logging.getLogger(n) for n in logger_names]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def _tuner_layers(unet) -> Iterator[BaseTunerLayer]:
    return (m for m in unet.modules() if isinstance(m, BaseTunerLayer))


def lora_config(settings: DPOSettings) -> LoraConfig:
    # lora_B starts at zero (PEFT default), so a fresh adapter reproduces the base model exactly.
    return LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha,
                      target_modules=list(settings.target_modules), init_lora_weights=True)


def add_adapter(unet, name: str, settings: DPOSettings) -> None:
    """Add client `name`'s adapter and make it the active one; the base and other adapters become frozen."""
    _require_mixin(unet)
    if has_adapter(unet, name):
        raise ValueError(f"adapter {name!r} already exists on the generator")
    # PEFT draws lora_A from the global RNG: seed it so an adapter's initial weights depend on (seed, name) only.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(settings.seed * 1_000_003 + zlib.crc32(name.encode()))
        # Several adapters on one model is the point here, not an accident PEFT should warn about.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.add_adapter(lora_config(settings), adapter_name=name)
    set_active_adapter(unet, name)


def set_active_adapter(unet, name: str) -> None:
    """Route the UNet through adapter `name` only; only its weights require grad afterwards."""
    _require(unet, name)
    unet.set_adapter(name)
    unet.enable_adapters()  # set_adapter leaves a previous disable_adapters() in force
    for n, p in unet.named_parameters():
        p.requires_grad_(f".{name}." in n and "lora_" in n)


def set_trainable_adapters(unet, names) -> None:
    """Make the LoRA weights of every adapter in `names` (and nothing else) require grad."""
    for name in names:
        _require(unet, name)
    marks = tuple(f".{name}." for name in names)
    for n, p in unet.named_parameters():
        p.requires_grad_("lora_" in n and any(m in n for m in marks))


BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@contextlib.contextmanager
def routed(unet, names):
    """Route row i of every UNet batch through adapter names[i] (BASE: the frozen base) in one pass.

    PEFT's mixed-adapter batches: each LoRA layer adds adapter k's update to its rows only, so rows never see
    another client's weights and each adapter's gradient comes from its own rows. PEFT injects `adapter_names`
    from PeftModel.forward, which a diffusers UNet does not have; the same pre-forward hook is registered on
    the LoRA layers here. Adapters must be enabled (not `adapters_disabled`)."""
    names = list(names)
    for name in set(names) - {BASE}:
        _require(unet, name)
    hook = functools.partial(_adapter_names_pre_forward_hook, adapter_names=names)
    layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    was_disabled = bool(layers) and layers[0].disable_adapters
    grads = {n: p.requires_grad for n, p in unet.named_parameters()}
    if was_disabled:  # a disabled layer ignores adapter_names
        unet.enable_adapters()
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers]
    try:
        yield unet
    finally:
        for h in handles:
            h.remove()
        if was_disabled:
            unet.disable_adapters()
        for n, p in unet.named_parameters():  # PEFT's enable/disable rewrites requires_grad
            p.requires_grad_(grads[n])


def active_adapter(unet):
    """Name of the active adapter, or None when there is none or adapters are disabled."""
    layer = next(_tuner_layers(unet), None)
    if layer is None or layer.disable_adapters:
        return None
    active = layer.active_adapters
    return active[0] if active else None


@contextlib.contextmanager
def using_adapter(unet, name: str):
    """Temporarily route the UNet through adapter `name`, restoring the previous routing afterwards."""
    previous = active_adapter(unet)
    set_active_adapter(unet, name)
    try:
        yield unet
    finally:
        if previous is not None and has_adapter(unet, previous):
            set_active_adapter(unet, previous)
        else:
            unet.disable_adapters()


@contextlib.contextmanager
def adapters_disabled(unet):
    """The frozen base model: the same UNet with every adapter bypassed (no copy)."""
    layers = list(_tuner_layers(unet))
    was_disabled = bool(layers) and layers[0].disable_adapters
    if not layers or was_disabled:
        yield unet
        return
    grads = {n: p.requires_grad for n, p in unet.named_parameters()}
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()
        # PEFT's enable/disable rewrites requires_grad; put back exactly what the caller had.
        for n, p in unet.named_parameters():
            p.requires_grad_(grads[n])


def adapter_parameters(unet, name: str) -> Dict[str, torch.nn.Parameter]:
    _require(unet, name)
    return {n: p for n, p in unet.named_parameters() if f".{name}." in n and "lora_" in n}


def adapter_size(unet, name: str) -> Tuple[int, int]:
    """(parameter count, bytes) of one adapter's weights."""
    params = adapter_parameters(unet, name).values()
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def save_adapter(unet, name: str, directory: str) -> str:
    """Write adapter `name` alone (weights + its LoRA config) to `directory`; returns the weights file path."""
    _require(unet, name)
    with _quiet("diffusers.models.modeling_utils"):  # "modules that should be kept in float32: []" on a no-op .to()
        unet.save_lora_adapter(directory, adapter_name=name, weight_name=WEIGHT_NAME)
    return os.path.join(directory, WEIGHT_NAME)


def load_adapter(unet, name: str, directory: str, replace: bool = False) -> None:
    """Load an adapter written by save_adapter under `name` and make it active."""
    _require_mixin(unet)
    path = os.path.join(directory, WEIGHT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no saved adapter at {path}")
    if has_adapter(unet, name):
        if not replace:
            raise ValueError(f"adapter {name!r} already exists on the generator (pass replace=True)")
        delete_adapter(unet, name)
    # prefix=None: the file's keys carry no "transformer."/"unet." prefix, and the default prefix silently matches
    # nothing, leaving a zero adapter. diffusers also reports other adapters' weights as "missing" when the name is
    # a substring of their keys (e.g. "c" in "conv1"): the key check below replaces that warning.
    with _quiet("diffusers.loaders.peft", "diffusers.utils.peft_utils"):
        unet.load_lora_adapter(directory, adapter_name=name, prefix=None, weight_name=WEIGHT_NAME)
    expected = set(_safetensors_keys(path))
    loaded = set(get_peft_model_state_dict(unet, adapter_name=name))
    if not expected or expected != loaded:
        delete_adapter(unet, name)
        raise ValueError(f"adapter file {path} does not fit this UNet ({len(expected)} tensors in the file, "
                         f"{len(loaded)} loaded)")
    set_active_adapter(unet, name)


def _safetensors_keys(path: str) -> List[str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return list(f.keys())


def delete_adapter(unet, name: str) -> None:
    _require(unet, name)
    unet.delete_adapters(name)
