"""How well a config's generator draws its classes: a judge classifier trained on real images the generator never
saw labels `--per-class` samples of each class, and agreement = the judge's label == the conditioning class.

    python -m benchmarks.judge --cf configs/fmnist_feddpd.yaml [--seeds 1 2 3] [--per-class 50] [--threads 2]
    python -m benchmarks.judge --cf configs/digits_feddpd.yaml --ship    # also ship the generator with the package

The generator is the one a run of the config uses (shipped, cached, or pretrained now). Judges: digits, an RBF-SVC
on the real digits outside the public split; Fashion-MNIST, cnn_small (width 32) on 2,000 real images per class
that no run of a `max_per_class` config touches. The judge's accuracy on other real images is the ceiling.
`--ship` copies the generator's cache entry into fedml_feddpd/generation/shipped/ with the command, the commit
and these scores (docs/RESULTS.md, "Shipped generators").
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F


def _unused_fashion(cfg, pool, per_class: int, seed: int = 1):
    """(judge, check) indices of real images outside the run's max_per_class draw (data.partition)."""
    from fedml_feddpd.data.partition import class_subsample

    _, left_out = class_subsample(pool.labels.numpy(), 10, cfg["public_seed"], cfg["max_per_class"])
    free, rng = np.concatenate(left_out), np.random.default_rng(seed)
    judge, check = [], []
    for c in range(10):
        idx = rng.permutation(free[pool.labels.numpy()[free] == c])
        judge.append(idx[:per_class])
        check.append(idx[per_class:per_class + 500])
    return np.concatenate(judge), np.concatenate(check)


def _cnn_judge(x, y, epochs: int = 3, seed: int = 0):
    from fedml_feddpd.models.cnn_small import CNNSmall

    torch.manual_seed(seed)
    model = CNNSmall(tuple(x.shape[1:]), 10, width=32)
    opt, g = torch.optim.Adam(model.parameters(), 1e-3), torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(128):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return lambda images: model(images).argmax(1)


def build_judge(cfg, data):
    """(predict(images) -> labels, accuracy on other real images, what it is)."""
    if cfg["dataset"] == "digits":
        from sklearn.svm import SVC

        from fedml_feddpd.data.digits import load_digits_tensors
        from fedml_feddpd.data.partition import split_public_train_test

        x, y = load_digits_tensors()
        public = split_public_train_test(y.numpy(), 10, cfg["public_fraction"], cfg["test_fraction"], 1.0, 0,
                                         public_seed=cfg["public_seed"]).public  # drawn by public_seed alone
        flat, rng = x.reshape(len(x), -1).numpy(), np.random.default_rng(1)
        idx = rng.permutation(np.setdiff1d(np.arange(len(y)), public))
        fit, check = idx[: len(idx) * 4 // 5], idx[len(idx) * 4 // 5:]
        svc = SVC().fit(flat[fit], y.numpy()[fit])
        accuracy = float((svc.predict(flat[check]) == y.numpy()[check]).mean())
        return (lambda images: torch.as_tensor(svc.predict(images.reshape(len(images), -1).numpy())), accuracy,
                f"RBF-SVC on {len(fit)} real digits outside the public split")
    from fedml_feddpd.data.sources import load_pool

    pool = load_pool(SimpleNamespace(**cfg.flat))
    fit, check = _unused_fashion(cfg, pool, 2000)
    predict = _cnn_judge(pool.images[fit], pool.labels[fit])
    with torch.no_grad():
        accuracy = float((predict(pool.images[check]) == pool.labels[check]).float().mean())
    return predict, accuracy, f"cnn_small (width 32) on {len(fit)} unused real Fashion-MNIST images"


def judge_generator(cfg, seeds, per_class: int) -> dict:
    from fedml_feddpd.data import build_federated
    from fedml_feddpd.generation import GeneratorConfig, load_or_pretrain_generator, sample

    data = build_federated(SimpleNamespace(**cfg.flat))
    gen_cfg = GeneratorConfig(**cfg.sections["generator"])
    gen = load_or_pretrain_generator(gen_cfg, *data.public, seed=cfg["public_seed"], progress=True)
    predict, ceiling, what = build_judge(cfg, data)
    per_seed = {}
    for seed in seeds:
        start = time.perf_counter()
        x, y = sample(gen.unet, gen.scheduler, [per_class] * data.class_num, steps=gen_cfg.sample_steps, seed=seed,
                      guidance_scale=gen_cfg.guidance_scale, null_class=gen.null_class, sampler=gen_cfg.sampler)
        with torch.no_grad():
            per_seed[seed] = float((predict(x) == y).float().mean())
        print(f"seed {seed}: agreement {per_seed[seed]:.3f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return {"generator": {"source": gen.source, "path": gen.path, "key": os.path.basename(gen.path or "")},
            "judge": what, "judge_accuracy_on_real": round(ceiling, 4), "per_class": per_class,
            "sampler": f"{gen_cfg.sampler} {gen_cfg.sample_steps}, guidance {gen_cfg.guidance_scale}",
            "agreement": {str(k): round(v, 4) for k, v in per_seed.items()},
            "agreement_mean": round(float(np.mean(list(per_seed.values()))), 4)}


def ship(result: dict, command: str) -> str:
    """Copy the judged generator's cache entry into the package (generation/shipped/<key>/), with how it was made."""
    from fedml_feddpd.experiment import source_commit
    from fedml_feddpd.generation.pretrain import META_FILE, SHIPPED_DIR

    src = result["generator"]["path"]
    dst = os.path.join(SHIPPED_DIR, result["generator"]["key"])
    if os.path.abspath(src) != os.path.abspath(dst):
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
    meta_path = os.path.join(dst, META_FILE)
    meta = json.load(open(meta_path))
    meta["made_by"] = {"command": command, "commit": source_commit(),
                       "judge": {k: v for k, v in result.items() if k != "generator"}}
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return dst


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cf", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ship", action="store_true", help="copy the generator into the package (developers)")
    parser.add_argument("--made-by", default=None, help="with --ship: the command that pretrained it")
    opts = parser.parse_args(argv)
    from fedml_feddpd.config import load_config
    from fedml_feddpd.fedml_compat import quiet_fedml_imports

    quiet_fedml_imports()
    torch.set_num_threads(opts.threads)
    result = judge_generator(load_config(opts.cf), opts.seeds, opts.per_class)
    if opts.ship:
        result["shipped_to"] = ship(result, opts.made_by or f"python -m fedml_feddpd pretrain --cf {opts.cf}")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
