"""The server-side step: after aggregation, choose a synthetic supplement for each client.

FedDPD and the generative baselines differ only in *how the supplement is chosen*: each is a
`SupplementPolicy`. `ServerStep` runs a policy at the rounds the config names, times it, and hands
each client's supplement to a delivery callback (FedML glue decides how it travels). The step sees,
per client, only what FedAvg already receives: the uploaded model parameters and the sample count.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from .errors import PrivacyBoundaryError
from .feddpd import FedDPDSettings, client_budget
from .scorer import Scorer
from .threads import torch_threads
from .uploads import mismatch, model_spec


@dataclass(frozen=True)
class ClientUpload:
    """Everything the server step may know about a client: id, sample count, model parameters."""

    client_id: int
    num_samples: int
    state_dict: dict


@dataclass
class Supplement:
    images: torch.Tensor   # (B, C, H, W) in [0, 1]
    labels: torch.Tensor   # (B,)
    stats: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.images.element_size() * self.images.numel() + self.labels.element_size() * self.labels.numel()


class GeneratorService:
    """What a policy needs from the generator: class-conditional sampling, with a client adapter
    when one was trained, and Diffusion-DPO of a client adapter. Wraps fedml_feddpd.generation."""

    def __init__(self, generator, dpo_settings, generator_config, threads: int = 0, sample_cache: bool = False):
        self.generator, self.dpo_settings = generator, dpo_settings
        self.sample_steps, self.sampler = generator_config.sample_steps, generator_config.sampler
        self.guidance_scale = generator_config.guidance_scale  # classifier-free guidance (1: off)
        self.threads = threads  # torch threads for sampling and DPO (run_args.generator_threads); 0: as set now
        self._states = None  # adapter_states, kept until an adapter changes (train_adapters, load_adapter_states)
        # run_args.sample_cache: the base generator's draws on disk beside the generator cache
        self.sample_dir = os.path.join(os.path.expanduser(generator_config.cache_dir), "samples") if sample_cache \
            else None

    def sample(self, class_counts, seed: int, adapter: Optional[str] = None):
        """Images for `class_counts` from `seed`, through `adapter` (None: the base UNet). With the sample cache, a
        base draw another run made with the same generator, inputs, device and threads is read back instead."""
        path = self._cached(class_counts, seed) if adapter is None else None
        if path is not None and os.path.isfile(path):
            images, labels = torch.load(path, map_location="cpu", weights_only=True)
            return images, labels
        out = self.sample_many({0: (class_counts, seed, adapter)})[0]
        if path is not None:
            os.makedirs(self.sample_dir, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            torch.save(out, tmp)
            os.replace(tmp, path)
        return out

    def _cached(self, class_counts, seed: int) -> Optional[str]:
        """The sample cache's file for a lone base draw, or None where a draw cannot be reused: no cache, a user's
        generator folder (its weights may change under the same path) or adapters in the UNet."""
        from .generation import adapter_names

        gen = self.generator
        if self.sample_dir is None or gen.source == "given" or not gen.path or adapter_names(gen.unet):
            return None
        spec = {"generator": os.path.basename(gen.path), "counts": [int(c) for c in class_counts], "seed": int(seed),
                "steps": self.sample_steps, "sampler": self.sampler, "guidance": self.guidance_scale,
                "null_class": gen.null_class, "device": str(next(gen.unet.parameters()).device),
                "threads": self.threads or torch.get_num_threads(), "torch": torch.__version__}
        return os.path.join(self.sample_dir, hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]
                            + ".pt")

    def sample_many(self, jobs: dict) -> dict:
        """{key: (class_counts, seed, adapter or None)} -> {key: (images, labels)}, every job in shared UNet
        batches, each row through its own adapter (None: the base). Each job equals `sample` with its seed."""
        from .generation import sample_jobs
        from .generation.adapters import BASE

        unet = self.generator.unet
        keys = list(jobs)
        with torch_threads(self.threads):
            out = sample_jobs(unet, self.generator.scheduler,
                              [(jobs[k][2] or BASE, [int(c) for c in jobs[k][0]], jobs[k][1]) for k in keys],
                              steps=self.sample_steps, guidance_scale=self.guidance_scale,
                              null_class=self.generator.null_class, sampler=self.sampler)
        return dict(zip(keys, out))

    def train_adapter(self, name: str, chosen, rejected, labels, seed: int) -> dict:
        return self.train_adapters({name: (chosen, rejected, labels, seed)})[name]

    def train_adapters(self, jobs: dict) -> dict:
        """Diffusion-DPO of every client adapter in `jobs` {name: (chosen, rejected, labels, seed)} together
        (generation.train_dpo_adapters). Without dpo_args.warm_start each starts afresh: preferences move with the
        models; with it, each continues from its weights of the previous supplement round."""
        from .generation import delete_adapter, has_adapter, train_dpo_adapters

        unet = self.generator.unet
        self._states = None
        for name in jobs:
            if has_adapter(unet, name) and not self.dpo_settings.warm_start:
                delete_adapter(unet, name)
        # a round's joint batch (every client's pairs) gains from threads as sampling does: 1.5x on 2 cores
        with torch_threads(self.threads):
            return train_dpo_adapters(unet, self.generator.scheduler, jobs, self.dpo_settings)

    def adapter_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every client adapter's LoRA weights (for checkpoints, written every round): copied once after the
        adapters change (a copy of each, every round, cost ~4 s of the README's FedDPD run)."""
        from .generation.adapters import adapter_weights

        if self._states is None:
            self._states = adapter_weights(self.generator.unet)
        return {name: dict(weights) for name, weights in self._states.items()}

    def load_adapter_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        from .generation import add_adapter, adapter_parameters, delete_adapter, has_adapter

        unet = self.generator.unet
        self._states = None
        for name, weights in states.items():
            if has_adapter(unet, name):
                delete_adapter(unet, name)
            add_adapter(unet, name, self.dpo_settings)
            params = adapter_parameters(unet, name)
            if set(params) != set(weights):
                raise ValueError(f"adapter {name!r} in the checkpoint does not fit this generator")
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(weights[k])


class SupplementPolicy:
    """Chooses each client's supplement. Subclasses override `build_supplements`; what a method reads of
    the config, its privacy note and its backends are in its methods.REGISTRY entry.

    `data` is the server's view of the run (data.FederatedData): a policy within FedAvg's boundary reads
    only `data.class_num` and the server's own public split (`data.public`); Balance and Oracle read more, and
    their registry entries say so."""

    def __init__(self, settings: FedDPDSettings, data, seed: int):
        self.settings, self.num_classes, self.seed = settings, data.class_num, seed

    def budget(self, upload: "ClientUpload", round_idx: int) -> int:
        """B_k = round(rho_t * n_k): the schedule's ratio at this round times the client's sample count."""
        return client_budget(upload.num_samples, self.settings.ratio(round_idx))

    def build_supplements(self, round_idx: int, global_state: dict, uploads: list[ClientUpload],
                          scorer: Scorer, generator: GeneratorService, timer: "StageTimer") -> dict[int, Supplement]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The policy's own state that later rounds depend on (checkpoint.py saves it every round and gives it
        back to `load_state_dict` on resume). A policy that builds every round's supplements afresh from the
        round's inputs and its seed has none: `{}`. A policy with state returns a non-empty dict even before
        its first supplement round (FedDiff: `{"shared": None}`), so a checkpoint without it is detectable."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned. A checkpoint written before policies saved their state gives
        `{}`, which a stateless policy accepts. A state the policy cannot take (here: any non-empty one) is a
        one-line ValueError whose message completes "checkpoint <path> ..." (checkpoint.py adds that)."""
        if state:
            raise ValueError(f"holds {type(self).__name__} state {sorted(state)}, but that policy keeps none")

    def _supplement(self, x, y, budget, counts) -> Supplement:
        return Supplement(x, y, {"budget": int(budget), "size": int(len(y)),
                                 "allocation": None if counts is None else [int(c) for c in counts],
                                 "classes": np.bincount(y.numpy(), minlength=self.num_classes).tolist()})


def with_kept(new: Supplement, previous: Supplement, share: float, rng: np.random.Generator) -> Supplement:
    """`new` plus a random `share` of `previous` (feddpd.keep_previous): the supplement a client trains on
    changes gradually instead of all at once. Applied at every switch, an image survives k switches with
    probability share**k, so a supplement holds at most B / (1 - share) images."""
    n = int(round(share * len(previous.labels)))
    if n == 0:
        return new
    keep = torch.as_tensor(np.sort(rng.choice(len(previous.labels), size=n, replace=False)))
    return Supplement(torch.cat([new.images, previous.images[keep].to(new.images.dtype)]),
                      torch.cat([new.labels, previous.labels[keep].to(new.labels.dtype)]),
                      {**new.stats, "kept": n})


class StageTimer:
    """Seconds per named server stage (pool, scoring, dpo, generation) within one round, and a
    status line for the progress bar while the server works through the clients."""

    def __init__(self, status: Optional[Callable[[str], None]] = None):
        self.seconds: dict[str, float] = {}
        self.status = status

    def each_client(self, uploads):
        for i, up in enumerate(uploads):
            if self.status:
                self.status(f"server step: client {i + 1}/{len(uploads)}")
            yield up
        if self.status:
            self.status("")

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def check_boundary(uploads, spec: dict) -> None:
    """The privacy boundary as code: each upload is a ClientUpload (frozen: nothing can be attached)
    whose state dict holds exactly the model's parameters and buffers, with their shapes and dtypes
    (`spec`: uploads.model_spec; uploads.mismatch is the check every upload passed before aggregation)."""
    for up in uploads:
        if type(up) is not ClientUpload:
            raise PrivacyBoundaryError(f"server step received a {type(up).__name__}; only ClientUpload(client_id, "
                                       "num_samples, state_dict) may cross")
        extra = sorted(set(up.state_dict) - set(spec))
        if extra:
            raise PrivacyBoundaryError(f"client {up.client_id}'s upload carries {extra[0]!r}, which is not a model "
                                       "parameter; only parameters and the sample count cross")
        why = mismatch(up.state_dict, spec)
        if why or not isinstance(up.num_samples, int):
            raise PrivacyBoundaryError(f"client {up.client_id}'s upload does not match the model "
                                       f"({why or 'num_samples'})")


class ServerStep:
    """Runs the policy on the rounds the schedule names: after aggregation, delivering each supplement to its client
    (delivery: client), or before it, training each upload on its supplement (delivery: server)."""

    def __init__(self, policy: SupplementPolicy, scorer: Scorer, generator: GeneratorService, last_round: int,
                 deliver: Callable[[int, Supplement], None]):
        self.policy, self.scorer, self.generator = policy, scorer, generator
        self.last_round, self.deliver = last_round, deliver
        self._spec = model_spec(scorer.model.state_dict())
        self.log: dict[int, dict] = {}
        self.delivered: dict[int, Supplement] = {}  # what each client holds now (checkpoints restore it)
        self.status: Optional[Callable[[str], None]] = None  # the runner points this at its progress bar

    @property
    def on_server(self) -> bool:
        """feddpd.delivery: server: supplements are trained on by the server, before aggregation."""
        return self.policy.settings.delivery == "server"

    def _build(self, round_idx: int, global_state: dict, uploads: list[ClientUpload], timer) -> dict:
        check_boundary(uploads, self._spec)
        return self.policy.build_supplements(round_idx, global_state, uploads, self.scorer, self.generator, timer)

    def before_aggregation(self, round_idx: int, uploads: list[ClientUpload],
                           average: Callable[[list], dict]) -> Optional[dict[int, dict]]:
        """delivery: server, at a due round: each client's upload trained by the server on its supplement, as
        {client id: state dict} to aggregate instead of the upload; None otherwise. The round's global model that
        selection compares each upload with is the FedAvg average of the uploads as they came (`average` of
        [(n, state)]); clients train and download exactly as under FedAvg."""
        if not self.on_server or not self.policy.settings.due(round_idx, self.last_round):
            return None
        provisional = average([(up.num_samples, copy.deepcopy(up.state_dict)) for up in uploads])
        timer = StageTimer(self.status)
        supplements = self._build(round_idx, provisional, uploads, timer)
        weight, trained = self.policy.settings.supplement_weight, {}
        by_id = {up.client_id: up for up in uploads}
        with timer("server_training"):
            for cid, sup in supplements.items():
                if len(sup.labels):
                    seed = int(np.random.default_rng([self.policy.seed, round_idx, cid]).integers(2**31))
                    trained[cid] = self.scorer.fit(by_id[cid].state_dict, sup.images, sup.labels, weight, seed)
        self._log(round_idx, timer, supplements, sent=False)
        return trained

    def __call__(self, round_idx: int, global_state: dict, uploads: list[ClientUpload]) -> None:
        """delivery: client: after aggregation, each client's supplement goes to it for its next round."""
        if self.on_server or not self.policy.settings.due(round_idx, self.last_round):
            return
        timer = StageTimer(self.status)
        supplements = self._build(round_idx, global_state, uploads, timer)
        keep = self.policy.settings.keep_previous
        for cid, sup in list(supplements.items()):
            if keep and cid in self.delivered:  # part of the previous supplement stays (damps the switch)
                rng = np.random.default_rng([self.policy.seed, round_idx, cid])
                supplements[cid] = sup = with_kept(sup, self.delivered[cid], keep, rng)
            self.deliver_supplement(cid, sup)
        self._log(round_idx, timer, supplements, sent=True)

    def _log(self, round_idx: int, timer, supplements: dict, sent: bool) -> None:
        """Per round: stage seconds, and per client its supplement's figures and the bytes it sent that client."""
        self.log[round_idx] = {
            "server_stage_seconds": timer.seconds,
            "supplements": {str(cid): {**sup.stats, "bytes": sup.nbytes, "sent_bytes": sup.nbytes if sent else 0}
                            for cid, sup in supplements.items()},
        }

    def deliver_supplement(self, cid: int, supplement: Supplement) -> None:
        self.delivered[cid] = supplement
        self.deliver(cid, supplement)
