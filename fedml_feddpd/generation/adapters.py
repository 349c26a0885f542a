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
def routed(unet, names, batched: bool = True):
    """Route row i of every UNet batch through adapter names[i] (BASE: the frozen base) in one pass.

    Each LoRA layer adds adapter k's update to its rows only, so rows never see another client's weights and each
    adapter's gradient comes from its own rows: PEFT's mixed-adapter batches, computed for all adapters at once
    (`_batched_lora`) instead of PEFT's loop over adapters inside every layer (LoraLayer._mixed_batch_forward),
    which made a round's DPO step grow faster than its client count. Layers `_batched_lora` does not cover (LoRA
    variants, dropout) keep PEFT's path, whose `adapter_names` argument PeftModel.forward would inject and a
    diffusers UNet does not: the same pre-forward hook is registered on them (on every layer with
    batched=False, PEFT's own loop: 40 adapters' forward and backward 2.4x slower than the gathered form).
    Adapters must be enabled."""
    names = list(names)
    for name in set(names) - {BASE}:
        _require(unet, name)
    order = sorted(set(names) - {BASE})
    slot = {name: k for k, name in enumerate(order)}
    rows = torch.tensor([slot.get(n, len(order)) for n in names], dtype=torch.long)  # len(order): BASE (zeros)
    peft_hook = functools.partial(_adapter_names_pre_forward_hook, adapter_names=names)
    layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    was_disabled = bool(layers) and layers[0].disable_adapters
    grads = {n: p.requires_grad for n, p in unet.named_parameters()}
    if was_disabled:  # a disabled layer ignores adapter_names
        unet.enable_adapters()
    handles, patched = [], []
    for m in layers:
        if batched and _batchable(m, order):
            m.forward = functools.partial(_batched_lora, m, order, rows, {})
            patched.append(m)
        else:
            handles.append(m.register_forward_pre_hook(peft_hook, with_kwargs=True))
    try:
        yield unet
    finally:
        for h in handles:
            h.remove()
        for m in patched:
            del m.forward
        if was_disabled:
            unet.disable_adapters()
        for n, p in unet.named_parameters():  # PEFT's enable/disable rewrites requires_grad
            p.requires_grad_(grads[n])


def _batchable(layer, order) -> bool:
    """Plain LoRA (no DoRA/variant, no dropout) on a Linear or Conv2d: what `_batched_lora` computes."""
    from peft.tuners.lora import layer as lora

    if type(layer) not in (lora.Linear, lora.Conv2d):  # exactly these: subclasses (e.g. quantised) compute otherwise
        return False
    return all(n in layer.lora_A and n not in layer.lora_variant and layer.lora_B[n].bias is None
               and isinstance(layer.lora_dropout[n], torch.nn.Identity)
               and layer.lora_B[n].weight.shape[2:] in ((), (1, 1)) for n in order)


def _batched_lora(layer, order, rows, gathered, x, *args, **kwargs):
    """base(x) + scaling_k * B_k A_k x for row i's adapter k = rows[i] (the last slot: zeros, the base), every
    adapter at once: the rows gather their own A and B, then batched matmuls (Linear) or a grouped convolution
    with one group per row (Conv2d; lora_B is PEFT's 1x1 convolution). Equals PEFT's mixed-batch forward
    (tests/test_dpo.py). Without gradients (sampling: every step of a batch through the same rows) the gathered
    weights are kept in `gathered` for the rest of the routed context."""
    result = layer.base_layer(x, *args, **kwargs)
    if not order:
        return result
    if torch.is_grad_enabled() or not gathered:
        a = torch.stack([layer.lora_A[n].weight for n in order])
        b = torch.stack([layer.lora_B[n].weight * layer.scaling[n] for n in order])
        rows = rows.to(a.device)
        # index_select, not a[rows]: the backward of advanced indexing (index_put_ with accumulate) adds rows'
        # gradients with atomics when torch runs more than one thread, so a step's result varied from run to run;
        # index_select's (index_add_) adds them in row order, as one thread does
        a = torch.cat([a, a.new_zeros((1,) + a.shape[1:])]).index_select(0, rows).to(x.dtype)
        b = torch.cat([b, b.new_zeros((1,) + b.shape[1:])]).index_select(0, rows).to(x.dtype)
        if not torch.is_grad_enabled():
            gathered["ab"] = a, b
    else:
        a, b = gathered["ab"]
    if x.dim() == 4 and a.dim() == 5:  # Conv2d: a (N, r, C, kh, kw), b (N, out, r, 1, 1)
        n, c, h, w = x.shape
        conv = layer.lora_A[order[0]]
        z = torch.nn.functional.conv2d(x.reshape(1, n * c, h, w), a.flatten(0, 1), None, conv.stride,
                                       conv.padding, conv.dilation, groups=n)
        z = z.view(n, a.shape[1], *z.shape[2:])
        return result + torch.einsum("nrhw,nor->nohw", z, b[..., 0, 0]).to(result.dtype)
    z = x.reshape(x.shape[0], -1, x.shape[-1])  # Linear: (N, tokens, in); a (N, r, in), b (N, out, r)
    out = torch.bmm(torch.bmm(z, a.transpose(1, 2)), b.transpose(1, 2))
    return result + out.view(result.shape).to(result.dtype)


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


def _weight_of(param_name: str, name: str) -> bool:
    """Whether UNet parameter `param_name` is a LoRA weight of adapter `name` (".client_1." is not ".client_10.")."""
    return f".{name}." in param_name and "lora_" in param_name


def adapter_parameters(unet, name: str) -> Dict[str, torch.nn.Parameter]:
    _require(unet, name)
    return {n: p for n, p in unet.named_parameters() if _weight_of(n, name)}


def adapter_weights(unet) -> Dict[str, Dict[str, torch.Tensor]]:
    """A copy of every adapter's LoRA weights, {name: {parameter name: tensor}}, in one pass over the UNet's
    parameters (`adapter_parameters` walks them once per adapter)."""
    names = adapter_names(unet)
    out = {name: {} for name in names}
    for k, p in unet.named_parameters():
        for name in names:
            if _weight_of(k, name):
                out[name][k] = p.detach().cpu().clone()
    return out


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
