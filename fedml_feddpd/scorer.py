"""The server's copy of the model: what the server step computes with a client's upload or the global model."""
from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch

from .threads import torch_threads


class Scorer:
    """The server's copy of the model, on `device`: class probabilities of candidates (generator space,
    data.spaces) under the global model or a client's upload, and `fit`, which trains a state dict on samples
    the way a client trains (local_training.py) with the run's optimizer settings `train_args`."""

    def __init__(self, model: torch.nn.Module, space=None, device="cpu", train_args=None, threads: int = 0):
        self.model = copy.deepcopy(model).to(device).eval()
        self.space, self.device, self.train_args = space, torch.device(device), train_args
        self.threads = threads  # torch threads of `probs` (a bank's batch gains from them; 0: as set now)
        self.initial_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def _to_model(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device)
        return self.space.to_model(x) if self.space is not None else x

    @torch.no_grad()
    def probs(self, state_dict: dict, images: torch.Tensor) -> np.ndarray:
        self.model.load_state_dict(state_dict)
        with torch_threads(self.threads):
            return torch.softmax(self.model(self._to_model(images)), dim=1).cpu().numpy()

    def fit(self, state_dict: dict, images: torch.Tensor, labels: torch.Tensor, weight: float, seed: int,
            epochs: Optional[int] = None) -> dict:
        """`state_dict` trained on (images, labels), each sample's loss weighted `weight`, for `epochs` (default:
        the clients' epochs) with the clients' optimizer, batch size and learning rate; shuffled from `seed`.
        The global torch RNG (dropout) is forked, so the clients' random streams do not depend on it."""
        from torch.utils.data import DataLoader, TensorDataset

        from .local_training import train_weighted

        args = self.train_args
        self.model.load_state_dict(state_dict)
        data = TensorDataset(self._to_model(images).cpu(), labels, torch.full((len(labels),), float(weight)))
        loader = DataLoader(data, batch_size=args.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            train_weighted(self.model, loader, self.device, args, args.epochs if epochs is None else epochs)
        self.model.eval()
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
