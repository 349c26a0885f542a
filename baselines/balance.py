from __future__ import annotations

import numpy as np

from fedml_feddpd.algorithm import client_budget, largest_remainder
from fedml_feddpd.supplement import SupplementPolicy


class BalancePolicy(SupplementPolicy):
    """Balance: per client, synthetic samples of its rare classes until its label histogram is uniform.

    Breaks FedDPD's privacy boundary: it needs each client's label counts (`client_histograms`), which
    the server under FedAvg or FedDPD never receives. It also assumes a uniform global distribution, the
    assumption FedDPD drops. Its budget is whatever flattening takes, not `supplement_ratio`.
    """

    def __init__(self, settings, data, seed):
        super().__init__(settings, data, seed)
        self.histograms = np.asarray(data.client_histograms, int)  # crosses the boundary: methods.LABEL_COUNTS

    def build_supplements(self, round_idx, global_state, uploads, scorer, generator, timer):
        rng = np.random.default_rng([self.seed, round_idx])
        out = {}
        for up in timer.each_client(uploads):
            budget, counts = self.allocation(up)
            with timer("generation"):
                x, y = generator.sample(counts, seed=int(rng.integers(2**31)))
            out[up.client_id] = self._supplement(x, y, budget, counts)
        return out

    def allocation(self, up) -> tuple[int, np.ndarray]:
        """(budget, samples per class) of a client: whatever flattening its histogram takes."""
        counts = flatten_counts(self.histograms[up.client_id])
        return int(counts.sum()), counts


class BalanceBudgetPolicy(BalancePolicy):
    """Balance@B: Balance's flattening direction at FedDPD's budget. Each client receives exactly
    B_k = client_budget(n_k, supplement_ratio) samples, split over classes in proportion to
    `flatten_counts` (largest remainder), so its rarer classes get more. A client whose histogram is
    already flat (nothing to flatten) gets B_k spread evenly over the classes, which keeps it flat.

    Reads the clients' label counts like Balance (methods.LABEL_COUNTS); isolates the effect of *which*
    classes a supplement holds from *how much* supplement there is, against FedDPD.
    """

    def allocation(self, up):
        budget = client_budget(up.num_samples, self.settings.supplement_ratio)
        return budget, budget_split(self.histograms[up.client_id], budget)


def budget_split(histogram: np.ndarray, budget: int) -> np.ndarray:
    """`budget` samples per class in proportion to flatten_counts(histogram); evenly when it is flat."""
    weights = flatten_counts(histogram)
    if weights.sum() == 0:
        weights = np.ones(len(weights), int)
    return largest_remainder(weights, budget)


def flatten_counts(histogram: np.ndarray) -> np.ndarray:
    """Samples per class that make `histogram` uniform at its largest class."""
    histogram = np.asarray(histogram, int)
    return histogram.max() - histogram
