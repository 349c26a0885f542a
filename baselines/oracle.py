from __future__ import annotations

import numpy as np

from fedml_feddpd.supplement import SupplementPolicy


class OraclePolicy(SupplementPolicy):
    """Oracle: real held-out samples drawn from the true global distribution, FedDPD's budget B_k.

    An upper bound, not deployable: it uses real data the server does not have (`data_args.oracle_fraction`
    of the clients' pool, held out with the same long-tailed profile). Drawing uniformly from that
    held-out set draws from the global class distribution.
    """

    def __init__(self, settings, data, seed):
        super().__init__(settings, data, seed)
        self.images, self.labels = data.oracle  # held-out real data: methods.HELD_OUT
        if len(self.labels) == 0:
            raise ValueError("data_args.oracle_fraction: Oracle needs held-out real data; expected a value > 0")

    def build_supplements(self, round_idx, global_state, uploads, scorer, generator, timer):
        rng = np.random.default_rng([self.seed, round_idx])
        out = {}
        for up in timer.each_client(uploads):
            budget = self.budget(up, round_idx)
            pick = rng.choice(len(self.labels), size=budget, replace=budget > len(self.labels))
            out[up.client_id] = self._supplement(self.images[pick], self.labels[pick], budget, None)
        return out
