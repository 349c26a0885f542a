from __future__ import annotations

import numpy as np

from fedml_feddpd.algorithm import client_budget, largest_remainder
from fedml_feddpd.supplement import SupplementPolicy


class FedDiffPolicy(SupplementPolicy):
    """FedDiff-style: one class-balanced synthetic set from the same generator, identical for every client.

    Generated once, at the first supplement round. Its size is the mean of the clients' FedDPD budgets
    `round(supplement_ratio * n_k)` that round, so a client receives as much synthetic data on average
    as under FedDPD. Uses no client information beyond FedAvg's sample counts.
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
