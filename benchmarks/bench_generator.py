"""Benchmark of the server's generator on embedded digits (not a test; prints numbers).

Public split = stratified 20% of load_digits (seeded); the generator is pretrained on it with the default
GeneratorConfig, and an RBF-SVC fit on the other 80% judges samples (agreement = SVC label == conditioning class).
Then Diffusion-DPO adapters with the default DPOSettings (batch 32 pairs) toward more / less ink.

    python benchmarks/bench_generator.py [--threads 2] [--cache-dir DIR] [--per-class 100]
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.svm import SVC  # noqa: E402

from fedml_feddpd.generation import (  # noqa: E402
    DPOSettings, GeneratorConfig, adapter_size, load_or_pretrain_generator, sample, save_adapter, using_adapter,
)
from fedml_feddpd.generation.dpo import train_dpo_adapter  # noqa: E402


def ink_pairs(x, y, seed=0):
    ink, g = x.mean(dim=(1, 2, 3)), torch.Generator().manual_seed(seed)
    out = ([], [], [])
    for c in range(10):
        idx = (y == c).nonzero().squeeze(1)
        hi, lo = idx[ink[idx] > ink[idx].median()], idx[ink[idx] < ink[idx].median()]
        n = min(len(hi), len(lo))
        out[0].append(x[hi[torch.randperm(len(hi), generator=g)[:n]]])
        out[1].append(x[lo[torch.randperm(len(lo), generator=g)[:n]]])
        out[2].append(torch.full((n,), c))
    return tuple(torch.cat(o) for o in out)


def judge(svc, imgs, labels):
    pred = svc.predict(imgs.reshape(len(imgs), -1).numpy())
    per_class = [float(np.mean(pred[labels.numpy() == c] == c)) for c in range(10)]
    return float(np.mean(pred == labels.numpy())), per_class


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest while other processes share 2 cores")
    ap.add_argument("--cache-dir", default=None, help="reuse a generator cache (default: fresh temp dir)")
    ap.add_argument("--per-class", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.int64)
    pub, rest = train_test_split(np.arange(len(y)), train_size=0.2, stratify=d.target, random_state=0)
    svc = SVC().fit(x[rest].reshape(len(rest), -1).numpy(), d.target[rest])
    print(f"public split {len(pub)} images, SVC on {len(rest)} real digits, torch threads {args.threads}")

    with tempfile.TemporaryDirectory() as tmp:
        cfg = GeneratorConfig(cache_dir=args.cache_dir or tmp)
        gen = load_or_pretrain_generator(cfg, x[pub], y[pub], seed=0, progress=True)
        n_params = sum(p.numel() for p in gen.unet.parameters())
        print(f"pretrain: {gen.seconds:.1f} s ({gen.source}, {cfg.pretrain_steps} steps x {cfg.pretrain_batch_size}, "
              f"{n_params / 1e6:.2f} M params, final loss {gen.final_loss})")

    counts = [args.per_class] * 10
    start = time.perf_counter()
    imgs, labels = sample(gen.unet, gen.scheduler, counts, steps=cfg.sample_steps, seed=1)
    secs = time.perf_counter() - start
    print(f"sampling: DDIM-{cfg.sample_steps}, {len(imgs)} images in {secs:.1f} s = {len(imgs) / secs:.1f} samples/s")
    overall, per_class = judge(svc, imgs, labels)
    print(f"quality: SVC agreement {overall:.3f} (target >= 0.90: {'PASS' if overall >= 0.9 else 'FAIL'}); "
          f"per class {' '.join(f'{c}:{a:.2f}' for c, a in enumerate(per_class))}; min {min(per_class):.2f}")
    base_ink = float(imgs.mean())

    settings = DPOSettings(seed=0)
    chosen, rejected, pair_labels = ink_pairs(x[pub], y[pub])
    for name, (w, l) in (("more_ink", (chosen, rejected)), ("less_ink", (rejected, chosen))):
        stats = train_dpo_adapter(gen.unet, gen.scheduler, name, w, l, pair_labels, settings)
        print(f"DPO {name}: {stats['steps']} steps x {settings.batch_size} pairs in {stats['seconds']:.1f} s = "
              f"{stats['steps_per_second']:.2f} steps/s; loss {stats['loss_first']:.3f} -> {stats['loss_final']:.3f}, "
              f"reward accuracy {stats['reward_accuracy']:.2f}")
        with using_adapter(gen.unet, name):
            a_imgs, a_labels = sample(gen.unet, gen.scheduler, counts, steps=cfg.sample_steps, seed=1)
        a_overall, a_per_class = judge(svc, a_imgs, a_labels)
        print(f"  ink {base_ink:.4f} -> {float(a_imgs.mean()):.4f} (shift {float(a_imgs.mean()) - base_ink:+.4f}); "
              f"SVC agreement {a_overall:.3f}, min per class {min(a_per_class):.2f}")
    n, nbytes = adapter_size(gen.unet, "more_ink")
    with tempfile.TemporaryDirectory() as tmp:
        path = save_adapter(gen.unet, "more_ink", tmp)
        print(f"adapter: {n} parameters, {nbytes} bytes in memory, {os.path.getsize(path)} bytes on disk "
              f"(rank {settings.lora_rank}, {', '.join(settings.target_modules)})")


if __name__ == "__main__":
    main()
