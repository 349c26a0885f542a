from __future__ import annotations

import numpy as np

from fedml_feddpd.feddpd import largest_remainder, take_per_class
from fedml_feddpd.supplement import Supplement, SupplementPolicy


class FedDiffPolicy(SupplementPolicy):
    """FedDiff-style: one class-balanced synthetic set from the same generator, identical for every client.

    Generated once, at the first supplement round. Its size is the mean of the clients' budgets
    `round(rho * n_k)` that round, so a client receives as much synthetic data on average as under FedDPD.
    Under the exponential schedule each later round delivers a class-balanced part of it, shrunk by the
    schedule's decay since that first round; under the periodic one, all of it. Uses no client information
    beyond FedAvg's sample counts.

    The shared set is the policy's state (`state_dict`): checkpoints hold it, so a resumed run reuses the
    set of the first supplement round instead of drawing a new one with a later round's seed.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shared, self.first_round = None, None

    def build_supplements(self, round_idx, global_state, uploads, scorer, generator, timer):
        if self.shared is None:
            size = int(round(np.mean([self.budget(up, round_idx) for up in uploads])))
            counts = largest_remainder(np.ones(self.num_classes), size)
            with timer("generation"):
                x, y = generator.sample(counts, seed=int(np.random.default_rng([self.seed, round_idx]).integers(2**31)))
            self.shared, self.first_round = self._supplement(x, y, size, counts), round_idx
        share = self.settings.ratio(round_idx) / self.settings.ratio(self.first_round)
        size = int(round(share * len(self.shared.labels)))
        sup = self.shared
        if size < len(sup.labels):
            counts = largest_remainder(np.ones(self.num_classes), size)
            pick = take_per_class(sup.labels.numpy(), counts)
            sup = self._supplement(sup.images[pick], sup.labels[pick], size, counts)
        return {up.client_id: sup for up in uploads}

    def state_dict(self) -> dict:
        """{"shared": (images, labels, stats), "first_round": r} of the shared set, or None before it exists."""
        s = self.shared
        return {"shared": None if s is None else (s.images, s.labels, s.stats), "first_round": self.first_round}

    def load_state_dict(self, state: dict) -> None:
        if not state:  # a checkpoint from before policies saved their state: the set cannot be rebuilt
            raise ValueError("predates FedDiff's saved shared set")
        if set(state) != {"shared", "first_round"}:
            raise ValueError(f"holds FedDiffPolicy state {sorted(state)}, expected ['first_round', 'shared']")
        self.shared = None if state["shared"] is None else Supplement(*state["shared"])
        self.first_round = state["first_round"]
