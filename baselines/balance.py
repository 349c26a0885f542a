from __future__ import annotations

import numpy as np

from fedml_feddpd.supplement import SupplementPolicy


class BalancePolicy(SupplementPolicy):
    """Balance: per client, synthetic samples of its rare classes until its label histogram is uniform.

    Breaks FedDPD's privacy boundary: it needs each client's label counts (`client_histograms`), which
    the server under FedAvg or FedDPD never receives. It also assumes a uniform global distribution, the
    assumption FedDPD drops. Its budget is whatever flattening takes, not `supplement_ratio`.
    """

    name = "Balance"
    uses_label_counts = True
    reads_feddpd, uses_dpo_args = SupplementPolicy.SCHEDULE, False

    def __init__(self, settings, num_classes, seed, client_histograms: np.ndarray):
        super().__init__(settings, num_classes, seed)
        self.histograms = np.asarray(client_histograms, int)

    def build_supplements(self, round_idx, global_state, uploads, scorer, generator, timer):
        rng = np.random.default_rng([self.seed, round_idx])
        out = {}
        for up in timer.each_client(uploads):
            counts = flatten_counts(self.histograms[up.client_id])
            with timer("generation"):
                x, y = generator.sample(counts, seed=int(rng.integers(2**31)))
            out[up.client_id] = self._supplement(x, y, int(counts.sum()), counts)
        return out


def flatten_counts(histogram: np.ndarray) -> np.ndarray:
    """Samples per class that make `histogram` uniform at its largest class."""
    histogram = np.asarray(histogram, int)
    return histogram.max() - histogram
