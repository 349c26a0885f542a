"""FedDPD's own settings: the `feddpd:` YAML section. Its defaults are the YAML defaults
(config.py reads them from here)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FedDPDSettings:
    """The `feddpd:` YAML section (docs/DESIGN.md, "The server step")."""

    warmup_rounds: int = 20
    supplement_every: int = 40
    pool_per_class: int = 64
    discrepancy: str = "prob_gap"
    tau: float = 0.2
    supplement_ratio: float = 0.5
    supplement_weight: float = 1.0
    # when a client's supplement is replaced, the share of its previous one it keeps (a random subset, so the
    # supplement changes gradually; 0: replaced outright). Its size stays bounded: at most B / (1 - keep).
    keep_previous: float = 0.0
    pair_quantile: float = 0.25
    oversample: float = 1.0
    dpo: bool = True
    selection: str = "discrepancy"
    # where a DPO client's supplement is picked from: its adapter's samples ("adapter"), or the pool and
    # those samples together ("union": the adapter can only add to what the pool already offers).
    # union, oversample 1, warm-started adapters and 10 DPO steps: chosen on validation data
    # (configs/validate_dpo_digits.yaml: no loss at 0.48x the server time)
    candidates: str = "union"

    def due(self, round_idx: int, last_round: int) -> bool:
        """Supplement after aggregation of this round? Never after the last one (nobody trains on it)."""
        return (round_idx >= self.warmup_rounds and round_idx < last_round
                and (round_idx - self.warmup_rounds) % self.supplement_every == 0)
