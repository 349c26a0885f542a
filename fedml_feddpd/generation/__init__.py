"""Server-side generator of FedDPD: class-conditional diffusers UNet, per-client LoRA adapters, Diffusion-DPO.

Images everywhere are float32 (N, C, H, W) in [0, 1]; labels int64 (N,). Import `train_dpo_adapter` from here or
from `.dpo` (importing it loads TRL, which takes a few seconds).
"""
import os

# TRL and huggingface_hub read these when first imported; the server runs offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from .adapters import (  # noqa: E402
    adapter_names, adapter_parameters, adapter_size, adapters_disabled, add_adapter, active_adapter, delete_adapter,
    has_adapter, load_adapter, lora_config, routed, save_adapter, set_active_adapter, set_trainable_adapters,
    using_adapter,
)
from .config import DPOSettings, GeneratorConfig  # noqa: E402
from .pretrain import ServerGenerator, cache_key, load_or_pretrain_generator, train_unet  # noqa: E402
from .sampling import labels_for_counts, sample, sample_jobs  # noqa: E402
from .unet import (  # noqa: E402
    GeneratorUNet, build_sample_scheduler, build_train_scheduler, build_unet, load_train_scheduler, load_unet,
)


def __getattr__(name):
    # TRL (and with it `datasets`) costs seconds to import: load the DPO module only when it is used.
    if name in ("train_dpo_adapter", "train_dpo_adapters", "build_dpo_trainer", "dpo_config", "DiffusionDPOTrainer"):
        from . import dpo

        return getattr(dpo, name)
    raise AttributeError(name)


__all__ = [
    "GeneratorConfig", "DPOSettings", "GeneratorUNet", "ServerGenerator", "build_unet", "build_train_scheduler",
    "build_sample_scheduler", "load_unet", "load_train_scheduler", "load_or_pretrain_generator", "train_unet",
    "cache_key", "sample", "sample_jobs", "routed", "set_trainable_adapters",
    "labels_for_counts", "add_adapter", "set_active_adapter", "active_adapter", "using_adapter", "adapters_disabled",
    "adapter_names", "has_adapter", "adapter_parameters", "adapter_size", "save_adapter", "load_adapter",
    "delete_adapter", "lora_config", "train_dpo_adapter", "train_dpo_adapters", "build_dpo_trainer", "dpo_config",
    "DiffusionDPOTrainer",
]
