from __future__ import annotations

import numpy as np

from fedml_feddpd.algorithm import client_budget, largest_remainder
from fedml_feddpd.supplement import Supplement, SupplementPolicy


class FedDiffPolicy(SupplementPolicy):
    """FedDiff-style: one class-balanced synthetic set from the same generator, identical for every client.

    Generated once, at the first supplement round. Its size is the mean of the clients' FedDPD budgets
    `round(supplement_ratio * n_k)` that round, so a client receives as much synthetic data on average
    as under FedDPD. Uses no client information beyond FedAvg's sample counts.

    The shared set is the policy's state (`state_dict`): checkpoints hold it, so a resumed run reuses the
    set of the first supplement round instead of drawing a new one with a later round's seed.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shared = None

    def build_supplements(self, round_idx, global_state, uploads, scorer, generator, timer):
        if self.shared is None:
            budgets = [client_budget(up.num_samples, self.settings.supplement_ratio) for up in uploads]
            size = int(round(np.mean(budgets)))
            counts = largest_remainder(np.ones(self.num_classes), size)
            with timer("generation"):
                x, y = generator.sample(counts, seed=int(np.random.default_rng([self.seed, round_idx]).integers(2**31)))
            self.shared = self._supplement(x, y, size, counts)
        return {up.client_id: self.shared for up in uploads}

    def state_dict(self) -> dict:
        """{"shared": (images, labels, stats)} of the shared set, or {"shared": None} before it exists."""
        s = self.shared
        return {"shared": None if s is None else (s.images, s.labels, s.stats)}

    def load_state_dict(self, state: dict) -> None:
        if not state:  # a checkpoint from before policies saved their state: the set cannot be rebuilt
            raise ValueError("predates FedDiff's saved shared set")
        if set(state) != {"shared"}:
            raise ValueError(f"holds FedDiffPolicy state {sorted(state)}, expected ['shared']")
        self.shared = None if state["shared"] is None else Supplement(*state["shared"])
