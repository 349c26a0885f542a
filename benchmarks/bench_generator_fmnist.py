"""The 28x28 generator of configs/fmnist_feddpd.yaml: its CPU pretraining cost and its quality (not a test).

Pretrains (or loads from the cache every run uses) the generator the config's FedDPD runs use: the same
public split (data_args.public_seed, max_per_class), the same GeneratorConfig. A judge, configs' cnn_small,
is trained centrally on Fashion-MNIST images that no run touches (outside the max_per_class subsample) and
scores `--per-class` samples per class (DDIM, the config's sample_steps and guidance_scale): agreement =
judge label == conditioning class, overall and per class, next to the judge's accuracy on other real
images and on the public split itself (the ceiling for a sampler that copied its training data).

    python benchmarks/bench_generator_fmnist.py [--cf configs/fmnist_feddpd.yaml] [--threads 2] [--per-class 50]
        [--samplers ddim:25,dpm:10,dpm:15] [--seeds 1,2,3]

Sampler rule for the Fashion-MNIST configs (written before the runs): among --samplers, the configs use
the one with the fewest UNet passes whose judged agreement, averaged over the seeds, is at most 0.02
below DDIM-25's; the per-seed paired differences are printed. The package default stays DDIM (chosen on
digits).
"""
import argparse
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def unused_real(cfg, pool):
    """Images of the pool outside the run's max_per_class subsample (the draw partition.py makes)."""
    from fedml_feddpd.data.partition import class_subsample

    _, left_out = class_subsample(pool.labels.numpy(), 10, cfg["public_seed"], cfg["max_per_class"])
    return np.concatenate(left_out)


def train_judge(x, y, epochs=3, seed=0):
    from fedml_feddpd.models.cnn_small import CNNSmall

    torch.manual_seed(seed)
    model = CNNSmall((1, 28, 28), 10, width=32)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(128):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y):
    return float((model(x).argmax(1) == y).float().mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cf", default="configs/fmnist_feddpd.yaml")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--judge-per-class", type=int, default=2000)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--samplers", default="ddim:25,dpm:10,dpm:15",
                    help="sampler:steps pairs to judge (generator.sampler, generator.sample_steps)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from fedml_feddpd.config import load_config
    from fedml_feddpd.data import build_federated
    from fedml_feddpd.data.sources import load_pool
    from fedml_feddpd.generation import GeneratorConfig, load_or_pretrain_generator, sample

    cfg = load_config(a.cf)
    args = SimpleNamespace(**cfg.flat)
    data = build_federated(args)
    gen_cfg = GeneratorConfig(**cfg.sections["generator"])
    print(f"public split: {len(data.public[1])} images, generator {gen_cfg.block_out_channels} x{gen_cfg.layers_per_block}, "
          f"{gen_cfg.pretrain_steps} steps of batch {gen_cfg.pretrain_batch_size}, {a.threads} threads", flush=True)
    gen = load_or_pretrain_generator(gen_cfg, *data.public, seed=cfg["public_seed"], progress=True)
    params = sum(p.numel() for p in gen.unet.parameters())
    print(f"generator: {gen.source} in {gen.seconds:.0f} s ({params / 1e6:.2f} M parameters) at {gen.path}", flush=True)

    pool = load_pool(args)
    free = unused_real(cfg, pool)
    rng = np.random.default_rng(1)
    judge_idx, check_idx = [], []
    for c in range(10):
        idx = rng.permutation(free[pool.labels.numpy()[free] == c])
        judge_idx.append(idx[:a.judge_per_class])
        check_idx.append(idx[a.judge_per_class:a.judge_per_class + 500])
    judge_idx, check_idx = np.concatenate(judge_idx), np.concatenate(check_idx)
    t0 = time.perf_counter()
    judge = train_judge(pool.images[judge_idx], pool.labels[judge_idx])
    print(f"judge: cnn_small(width 32) on {len(judge_idx)} unused real images in {time.perf_counter() - t0:.0f} s; "
          f"accuracy on {len(check_idx)} other unused real images {accuracy(judge, pool.images[check_idx], pool.labels[check_idx]):.3f}, "
          f"on the public split {accuracy(judge, *data.public):.3f}", flush=True)
    agreement = {}
    for spec in a.samplers.split(","):
        sampler, steps = spec.split(":")
        for seed in map(int, a.seeds.split(",")):
            t0 = time.perf_counter()
            x, y = sample(gen.unet, gen.scheduler, [a.per_class] * 10, steps=int(steps), seed=seed,
                          guidance_scale=gen_cfg.guidance_scale, null_class=gen.null_class, sampler=sampler)
            secs = time.perf_counter() - t0
            with torch.no_grad():
                pred = judge(x).argmax(1)
            agreement[spec, seed] = float((pred == y).float().mean())
            per_class = [float((pred[y == c] == c).float().mean()) for c in range(10)]
            print(f"samples {sampler} {steps} steps, seed {seed}: {len(y)} in {secs:.0f} s ({len(y) / secs:.1f} img/s, "
                  f"guidance {gen_cfg.guidance_scale}); judged agreement {agreement[spec, seed]:.3f}; "
                  f"per class {' '.join(f'{v:.2f}' for v in per_class)}", flush=True)
    seeds, specs = list(map(int, a.seeds.split(","))), a.samplers.split(",")
    for spec in specs[1:]:
        diffs = [agreement[spec, s] - agreement[specs[0], s] for s in seeds]
        print(f"{spec} - {specs[0]}: mean {np.mean(diffs):+.3f}, per seed {' '.join(f'{d:+.3f}' for d in diffs)}")


if __name__ == "__main__":
    main()
