"""The candidate bank: the generated samples the server scores at every supplement round.

It holds the base generator's samples (`bank_per_class` per class, drawn again every `bank_refresh` rounds) and,
per client whose adapter was trained with DPO, that adapter's newest samples. Selecting a supplement scores
the bank with the global model and the client's upload (forward passes only), so a supplement every round costs
classifier inference, not diffusion sampling.

Its size is bounded: C * bank_per_class base samples plus at most `adapter_samples` per client. It is part of
the policy's state, so checkpoints hold it and a resumed run scores the same candidates.
"""
from __future__ import annotations

from typing import Optional

import torch

BASE = -1  # the source id of the base generator's samples


class CandidateBank:
    def __init__(self):
        self.base: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.refreshed_at: Optional[int] = None
        self.adapted: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # client id -> its adapter's samples
        self.version = 0  # counts changes, so that scores of the unchanged bank can be kept

    def stale(self, round_idx: int, refresh_every: int) -> bool:
        """No base samples yet, or `refresh_every` (> 0) rounds have passed since they were drawn."""
        return self.base is None or (refresh_every > 0 and round_idx - self.refreshed_at >= refresh_every)

    def set_base(self, images: torch.Tensor, labels: torch.Tensor, round_idx: int) -> None:
        self.base, self.refreshed_at = (images, labels), round_idx
        self.version += 1

    def set_adapted(self, client_id: int, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Client `client_id`'s adapter's newest samples replace its previous ones."""
        self.adapted[int(client_id)] = (images, labels)
        self.version += 1

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, labels, source): the base samples first, then each client's adapter samples by client id."""
        parts = ([(BASE, *self.base)] if self.base is not None else []) + [
            (cid, *self.adapted[cid]) for cid in sorted(self.adapted)]
        if not parts:
            raise ValueError("the candidate bank is empty")
        return (torch.cat([x for _, x, _ in parts]), torch.cat([y for _, _, y in parts]),
                torch.cat([torch.full((len(y),), src, dtype=torch.int64) for src, _, y in parts]))

    def __len__(self) -> int:
        return (len(self.base[1]) if self.base is not None else 0) + sum(len(y) for _, y in self.adapted.values())

    def state_dict(self) -> dict:
        return {"base": self.base, "refreshed_at": self.refreshed_at, "adapted": dict(self.adapted)}

    def load_state_dict(self, state: dict) -> None:
        self.base, self.refreshed_at = state["base"], state["refreshed_at"]
        self.adapted = {int(k): v for k, v in state["adapted"].items()}
        self.version += 1
