"""Pretrain the server's generator on its public split, cached on disk; or load a user's pretrained UNet."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no cache lock; concurrent runs may each pretrain, as before
    fcntl = None

from ..errors import ConfigError
from .config import GeneratorConfig
from .unet import GeneratorUNet, build_train_scheduler, build_unet, check_matches, load_train_scheduler, load_unet

logger = logging.getLogger(__name__)


class GeneratorFileError(ConfigError):
    """A corrupt generator cache entry or an unusable `generator.pretrained` folder: one line, exit 2."""

CACHE_FORMAT = 1
META_FILE = "feddpd_generator.json"
# Generators that come with the package, each a cache entry under its key (benchmarks/judge.py --ship made them;
# their feddpd_generator.json says with which command, at which commit, and how the judge scored them)
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shipped")
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
# Architecture keys a cached config.json must reproduce exactly; anything else (diffusers version) may differ.
ARCH_KEYS = ("sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block", "norm_num_groups",
             "down_block_types", "up_block_types", "attention_head_dim", "num_class_embeds")
# Fields that do not change the trained weights, so changing them must not invalidate a cache.
_NOT_IN_KEY = ("sample_steps", "sampler", "guidance_scale", "pretrained", "cache_dir")


@dataclass
class ServerGenerator:
    """A ready generator: frozen UNet, its training-noise scheduler, and where it came from."""

    unet: GeneratorUNet
    scheduler: DDPMScheduler
    source: str  # "shipped" (with the package), "cache", "pretrained" (now) or "given" (generator.pretrained)
    path: Optional[str]
    seconds: float
    final_loss: Optional[float] = None
    # The label trained by label dropout, for classifier-free guidance (sample(..., null_class=)); None without one.
    null_class: Optional[int] = None


def data_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (images.detach().to(torch.float32).contiguous().cpu(), labels.detach().to(torch.int64).contiguous().cpu()):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def cache_key(cfg: GeneratorConfig, images: torch.Tensor, labels: torch.Tensor, seed: int) -> str:
    spec = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IN_KEY}
    blob = json.dumps({"format": CACHE_FORMAT, "config": spec, "data": data_fingerprint(images, labels), "seed": seed},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_data(images: torch.Tensor, labels: torch.Tensor, cfg: GeneratorConfig) -> None:
    shape = cfg.image_shape
    if images.ndim != 4 or tuple(images.shape[1:]) != shape:
        raise ValueError(f"generator data: expected images of shape (N, {', '.join(map(str, shape))}), "
                         f"got {tuple(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images) or len(images) == 0:
        raise ValueError(f"generator data: expected {len(images)} labels (N,) for N >= 1 images, "
                         f"got shape {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= cfg.num_classes:
        raise ValueError(f"generator data: labels must lie in 0..{cfg.num_classes - 1}, "
                         f"got {int(labels.min())}..{int(labels.max())}")


def _arch(config) -> dict:
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in ((k, config[k]) for k in ARCH_KEYS)}


def _load_cached(folder: str, key: str, cfg: GeneratorConfig) -> GeneratorUNet:
    """Load a cache entry, raising ValueError if anything about it is off (never use a doubtful cache)."""
    meta_path, weights = os.path.join(folder, META_FILE), os.path.join(folder, WEIGHTS_FILE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        with open(os.path.join(folder, "config.json")) as f:
            saved_config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"unreadable metadata ({type(exc).__name__})") from exc
    if meta.get("key") != key:
        raise ValueError("metadata key does not match the config/data/seed")
    expected = _arch(build_unet(cfg).config)
    if _arch(saved_config) != expected:
        raise ValueError("config.json does not match the generator config")
    if not os.path.isfile(weights) or _file_sha256(weights) != meta.get("weights_sha256"):
        raise ValueError("weights file missing or its checksum differs")
    unet = GeneratorUNet.from_pretrained(folder, local_files_only=True)
    return unet


def _save_cache(unet: GeneratorUNet, folder: str, meta: dict) -> None:
    root = os.path.dirname(folder)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=f".{os.path.basename(folder)}.tmp-")
    try:
        unet.save_pretrained(tmp, safe_serialization=True)
        meta = dict(meta, weights_sha256=_file_sha256(os.path.join(tmp, WEIGHTS_FILE)))
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        if os.path.exists(folder):  # a concurrent run finished first; its entry is equivalent
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _cache_lock(folder: str, key: str):
    """Hold an exclusive advisory lock on `<folder>.lock` so that concurrent runs pretrain a cache entry once.

    fcntl.flock, so POSIX only (without fcntl this is a no-op). The lock file is removed on release; a waiter
    that then gets the lock on the removed file notices (its inode is no longer the path's) and locks afresh.
    The kernel drops the lock when its holder dies, so a crashed run never blocks the next one.
    """
    if fcntl is None:
        yield
        return
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    path = folder + ".lock"
    said = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not said:
                    print(f"waiting for another process pretraining generator {key} (lock {path})",
                          file=sys.stderr, flush=True)
                    said = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                st = os.stat(path)
                current = (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)  # the holder removed that file on release: lock the new one
    try:
        yield
    finally:
        try:
            os.unlink(path)  # while still locked, so nobody holds a lock on a file we then remove
        except OSError:
            pass
        os.close(fd)  # releases the lock


def train_unet(cfg: GeneratorConfig, images: torch.Tensor, labels: torch.Tensor, seed: int = 0,
               progress: bool = True, device="cpu") -> tuple:
    """Denoising training with label dropout and EMA on `device`; returns (EMA UNet on the CPU, scheduler,
    last-100-step mean loss). Every random draw comes from a CPU generator, so the draws do not depend on
    the device (the arithmetic does, slightly).

    On a GPU a step of this small UNet is bound by kernel launches and host round trips, not arithmetic: the
    training images stay on the device (only the drawn indices, noise and timesteps travel), AdamW is fused, the
    EMA updates every tensor in one foreach call, and the loss is read back every 50 steps, not every step. On the
    CPU none of that applies, and the steps are those of a plain loop, bit for bit."""
    torch.manual_seed(seed)
    cuda = torch.device(device).type == "cuda"
    unet, scheduler = build_unet(cfg).to(device), build_train_scheduler(cfg)
    gen = torch.Generator().manual_seed(seed)
    x_all = (images.to(torch.float32) * 2.0 - 1.0).to(device)
    y_all = labels.to(torch.int64).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0, fused=True if cuda else None)
    lr_sched = get_cosine_schedule_with_warmup(opt, min(100, cfg.pretrain_steps // 10), max(cfg.pretrain_steps, 1))
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, foreach=cuda)
    unet.train()
    losses = []  # detached loss tensors, on the device
    # With total known, tqdm's bar shows steps done, elapsed time, the ETA ("<remaining") and the rate.
    bar = tqdm(range(cfg.pretrain_steps), total=cfg.pretrain_steps, desc="pretrain generator", disable=not progress,
               leave=False)
    for step in bar:
        idx = torch.randint(len(x_all), (cfg.pretrain_batch_size,), generator=gen)
        drop = torch.rand(len(idx), generator=gen) < cfg.label_dropout
        noise = torch.randn((len(idx),) + tuple(x_all.shape[1:]), generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        idx, drop, noise, t = (v.to(device, non_blocking=True) for v in (idx, drop, noise, t))
        x0, y = x_all[idx], y_all[idx].masked_fill(drop, cfg.null_class)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t, class_labels=y).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        losses.append(loss.detach())
        if step % 50 == 0 and progress:
            bar.set_postfix(loss=f"{torch.stack(losses[-50:]).mean().item():.4f}")
    ema.copy_to(unet.parameters())
    last = [v.item() for v in losses[-100:]]
    final = sum(last) / len(last) if last else None
    return unet.to("cpu"), scheduler, final


def _null_class(unet: GeneratorUNet, cfg: GeneratorConfig) -> Optional[int]:
    """cfg.null_class if label dropout trained it (for `pretrained`, label_dropout states how that UNet was trained)."""
    embeds = unet.config.num_class_embeds
    return cfg.null_class if cfg.label_dropout > 0 and embeds is not None and embeds > cfg.null_class else None


def _frozen(unet: GeneratorUNet) -> GeneratorUNet:
    unet.requires_grad_(False)
    unet.zero_grad(set_to_none=True)  # pretraining's last gradients: a frozen UNet holds none
    return unet.eval()


def load_or_pretrain_generator(cfg: GeneratorConfig, images: torch.Tensor, labels: torch.Tensor, seed: int = 0,
                               progress: bool = True, device="cpu") -> ServerGenerator:
    """The server's generator: `cfg.pretrained` if set, else a cached or freshly trained UNet on (images, labels).

    images: float32 (N, C, H, W) in [0, 1]; labels: int64 (N,) in 0..num_classes-1 (the public split).
    """
    start = time.perf_counter()
    if cfg.pretrained is not None:
        try:
            unet = load_unet(cfg.pretrained)
            check_matches(unet, cfg)
        except ValueError as exc:
            raise GeneratorFileError(str(exc).splitlines()[0]) from None
        return ServerGenerator(_frozen(unet), load_train_scheduler(cfg.pretrained, cfg), "given", cfg.pretrained,
                               time.perf_counter() - start, null_class=_null_class(unet, cfg))
    _check_data(images, labels, cfg)
    key = cache_key(cfg, images, labels, seed)
    shipped = os.path.join(SHIPPED_DIR, key)
    if os.path.isdir(shipped):  # the package's own generator for this config and data: checked like a cache entry
        try:
            unet = _load_cached(shipped, key, cfg)
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise GeneratorFileError(f"shipped generator {shipped}: unusable ({reason}); expected the files that "
                                     "came with fedml-feddpd: reinstall it") from None
        return ServerGenerator(_frozen(unet), build_train_scheduler(cfg), "shipped", shipped,
                               time.perf_counter() - start, null_class=_null_class(unet, cfg))
    folder = os.path.join(os.path.expanduser(cfg.cache_dir), key)
    if not os.path.isdir(folder):
        # Concurrent runs (compare --workers, MPI ranks, silo parties) pretrain this entry once: the first to
        # lock trains and writes it; the others wait, then find the finished entry and load it below, unlocked
        # (entries appear whole by rename, so a present folder is complete).
        with _cache_lock(folder, key):
            if not os.path.isdir(folder):
                unet, scheduler, final = train_unet(cfg, images, labels, seed, progress, device)
                meta = {"key": key, "format": CACHE_FORMAT, "seed": seed,
                        "data_sha256": data_fingerprint(images, labels), "generator_config": cfg.to_dict(),
                        "final_loss": final, "steps": cfg.pretrain_steps}
                _save_cache(unet, folder, meta)
                logger.info("generator trained in %.1fs and cached at %s", time.perf_counter() - start, folder)
                return ServerGenerator(_frozen(unet), scheduler, "pretrained", folder, time.perf_counter() - start,
                                       final, null_class=_null_class(unet, cfg))
    # Here the entry exists: it did before, or another run wrote it while this one waited for the lock.
    try:
        unet = _load_cached(folder, key, cfg)
        logger.info("generator loaded from cache %s", folder)
        return ServerGenerator(_frozen(unet), build_train_scheduler(cfg), "cache", folder,
                               time.perf_counter() - start, null_class=_null_class(unet, cfg))
    except Exception as exc:  # any failure to load means the entry is unusable, whatever raised it
        # Entries are written atomically, so a bad one was damaged from outside: say so and stop
        # rather than silently spending minutes retraining (the user decides).
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GeneratorFileError(f"generator cache {folder}: unusable ({reason}); expected an entry written by "
                                 "feddpd; delete that folder to retrain the generator") from None
