from __future__ import annotations

import numpy as np

from fedml_feddpd.feddpd import largest_remainder, take_per_class
from fedml_feddpd.supplement import Supplement, SupplementPolicy


class BalancePolicy(SupplementPolicy):
    """Balance: per client, synthetic samples of its rare classes until its label histogram is uniform.

    Breaks FedDPD's privacy boundary: it needs each client's label counts (`client_histograms`), which
    the server under FedAvg or FedDPD never receives. It also assumes a uniform global distribution, the
    assumption FedDPD drops. Its budget is whatever flattening takes, not `supplement_ratio`.
    """

    def __init__(self, settings, data, seed):
        super().__init__(settings, data, seed)
        self.histograms = np.asarray(data.client_histograms, int)  # crosses the boundary: methods.LABEL_COUNTS
        # exponential schedule (a supplement every round): each client's set is drawn once, at its first supplement
        # round, and later rounds deliver the part their allocation asks for; periodic: drawn anew every time
        self.drawn: dict[int, Supplement] = {}

    def build_supplements(self, round_idx, global_state, uploads, scorer, generator, timer):
        rng = np.random.default_rng([self.seed, round_idx])
        once = self.settings.schedule == "exponential"
        out = {}
        for up in timer.each_client(uploads):
            budget, counts = self.allocation(up, round_idx)
            seed = int(rng.integers(2**31))
            if once and up.client_id in self.drawn:
                held = self.drawn[up.client_id]
                pick = take_per_class(held.labels.numpy(), counts)
                out[up.client_id] = self._supplement(held.images[pick], held.labels[pick], budget, counts)
                continue
            with timer("generation"):
                x, y = generator.sample(counts, seed=seed)
            out[up.client_id] = self._supplement(x, y, budget, counts)
            if once:
                self.drawn[up.client_id] = out[up.client_id]
        return out

    def state_dict(self) -> dict:
        return {"drawn": {cid: (s.images, s.labels, s.stats) for cid, s in self.drawn.items()}}

    def load_state_dict(self, state: dict) -> None:
        if not state and self.settings.schedule == "exponential":  # the draws later rounds cut from are gone
            raise ValueError("predates Balance's saved draws")
        if set(state) - {"drawn"}:
            raise ValueError(f"holds {type(self).__name__} state {sorted(state)}, expected ['drawn']")
        self.drawn = {int(cid): Supplement(*s) for cid, s in state.get("drawn", {}).items()}

    def allocation(self, up, round_idx: int) -> tuple[int, np.ndarray]:
        """(budget, samples per class) of a client: whatever flattening its histogram takes."""
        counts = flatten_counts(self.histograms[up.client_id])
        return int(counts.sum()), counts


class BalanceBudgetPolicy(BalancePolicy):
    """Balance@B: Balance's flattening direction at FedDPD's budget. Each client receives exactly
    B_k = round(rho_t * n_k) samples, split over classes in proportion to
    `flatten_counts` (largest remainder), so its rarer classes get more. A client whose histogram is
    already flat (nothing to flatten) gets B_k spread evenly over the classes, which keeps it flat.

    Reads the clients' label counts like Balance (methods.LABEL_COUNTS); isolates the effect of *which*
    classes a supplement holds from *how much* supplement there is, against FedDPD.
    """

    def allocation(self, up, round_idx):
        budget = self.budget(up, round_idx)
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
