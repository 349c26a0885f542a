"""Where fedml-feddpd spends its time, in one JSON object: the generator's stages, scoring, and whole runs.

    python -m benchmarks.speed [--device cpu|cuda] [--cf configs/fmnist_feddpd.yaml] [--skip-runs] [--out speed.json]

Stages, on the config's generator (the shipped one for the README's configs) and model, on `--device` with the
config's generator threads (`run_args.generator_threads`, 0 = all cores):
  pretrain_steps_per_s   UNet training steps of the config's batch on its public split (a copy; nothing cached)
  sample_images_per_s    the config's sampler and steps (DDIM 25, guidance 1.5) at the batch sampling uses
  dpo_steps_per_s        joint Diffusion-DPO steps of 10 client adapters (dpo_args.batch_size pairs each)
  score_images_per_s     forward passes of the classifier over a bank-sized batch (what each round's scoring does)
Runs (not with --skip-runs): the config's FedDPD run and FedAvg on the same config, each as its own
`python -m fedml_feddpd run` process, twice: `cold` with an empty generator cache (the shipped generator or a
pretraining), then `warm`; wall seconds as the process took them, and FedDPD / FedAvg.
Time the machine when it is otherwise idle: two busy cores make every number 2-3x slower.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]


def _rate(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return repeats / (time.perf_counter() - start)


def stages(cfg, device: str, steps: int) -> dict:
    from fedml_feddpd.data import build_federated
    from fedml_feddpd.generation import (DPOSettings, GeneratorConfig, load_or_pretrain_generator, sample_jobs,
                                         train_dpo_adapters, train_unet)
    from fedml_feddpd.generation.adapters import BASE
    from fedml_feddpd.models import create_model
    from fedml_feddpd.scorer import Scorer

    data = build_federated(SimpleNamespace(**cfg.flat))
    gen_cfg = GeneratorConfig(**cfg.sections["generator"])
    out = {}
    start = time.perf_counter()
    train_unet(GeneratorConfig(**{**cfg.sections["generator"], "pretrain_steps": steps}), *data.public, seed=0,
               progress=False, device=device)
    out["pretrain_steps_per_s"] = steps / (time.perf_counter() - start)
    gen = load_or_pretrain_generator(gen_cfg, *data.public, seed=cfg["public_seed"], progress=False, device=device)
    gen.unet.to(device)
    out["generator"] = gen.source
    batch = 256
    job = [(BASE, [batch // data.class_num] * data.class_num, 1)]
    n = sum(job[0][1])

    def draw():
        sample_jobs(gen.unet, gen.scheduler, job, steps=gen_cfg.sample_steps, guidance_scale=gen_cfg.guidance_scale,
                    null_class=gen.null_class, sampler=gen_cfg.sampler, batch_size=batch)

    out["sample_images_per_s"] = n * _rate(draw, 1)
    out["sample_batch"] = batch
    dpo = DPOSettings(**{**cfg.sections["dpo_args"], "max_steps": steps})
    x, y = data.public
    per = dpo.batch_size * 2
    jobs = {f"client_{k}": (x[k * per:(k + 1) * per], x[(k + 1) * per:(k + 2) * per], y[k * per:(k + 1) * per], k)
            for k in range(10)}
    start = time.perf_counter()
    stats = train_dpo_adapters(gen.unet, gen.scheduler, jobs, dpo)
    out["dpo_steps_per_s"] = steps / (time.perf_counter() - start)
    out["dpo_adapters"] = len(stats)
    model = create_model(SimpleNamespace(**cfg.flat), data.class_num, data.space.shape)
    scorer = Scorer(model, data.space, device)
    bank = x[: 64 * data.class_num]
    state = model.state_dict()
    out["score_images_per_s"] = len(bank) * _rate(lambda: scorer.probs(state, bank), 5)
    out["score_batch"] = len(bank)
    return out


def _run(config: Path, out: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedml_feddpd", "run", "--cf", str(config), "--out", str(out),
                    "--no-progress"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def runs(cf: str, device: str) -> dict:
    """The config's FedDPD run and FedAvg on it, cold then warm (an empty generator cache, then the same again)."""
    import yaml

    out = {}
    with tempfile.TemporaryDirectory(prefix="feddpd-speed-") as tmp:
        tmp = Path(tmp)
        for method in ("FedDPD", "FedAvg"):
            raw = yaml.safe_load(open(ROOT / cf))
            raw["train_args"]["federated_optimizer"] = method
            raw["run_args"]["baseline"] = "none"
            raw["device_args"]["using_gpu"] = device == "cuda"
            raw.setdefault("generator", {})["cache_dir"] = str(tmp / "cache")
            config = tmp / f"{method}.yaml"
            config.write_text(yaml.safe_dump(raw))
            for phase in ("cold", "warm"):
                out[f"{method}_{phase}_s"] = round(_run(config, tmp / f"{method}_{phase}"), 1)
                result = json.loads((tmp / f"{method}_{phase}" / "metrics.json").read_text())
                out[f"{method}_{phase}_generator"] = (result.get("generator") or {}).get("source")
    for phase in ("cold", "warm"):
        out[f"ratio_{phase}"] = round(out[f"FedDPD_{phase}_s"] / out[f"FedAvg_{phase}_s"], 2)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cf", default="configs/fmnist_feddpd.yaml")
    parser.add_argument("--steps", type=int, default=20, help="pretraining and DPO steps timed")
    parser.add_argument("--skip-runs", action="store_true")
    parser.add_argument("--out", default=None)
    opts = parser.parse_args(argv)
    from fedml_feddpd.config import load_config
    from fedml_feddpd.fedml_compat import quiet_fedml_imports
    from fedml_feddpd.threads import torch_threads

    quiet_fedml_imports()
    cfg = load_config(ROOT / opts.cf)
    threads = cfg["generator_threads"] or os.cpu_count() or 1
    result = {"config": opts.cf, "device": opts.device, "threads": threads, "cores": os.cpu_count(),
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "load_1min": round(os.getloadavg()[0], 2)}
    with torch_threads(threads):
        result.update({k: round(v, 2) if isinstance(v, float) else v for k, v in stages(cfg, opts.device, opts.steps).items()})
    if not opts.skip_runs:
        result.update(runs(opts.cf, opts.device))
    text = json.dumps(result, indent=1)
    print(text)
    if opts.out:
        Path(opts.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
