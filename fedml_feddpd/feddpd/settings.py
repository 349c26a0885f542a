"""FedDPD's own settings: the `feddpd:` YAML section. Its defaults are the YAML defaults (config.py reads them
from here); docs/CONFIG.md says what each key does and docs/RESULTS.md how the defaults were chosen."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from . import schedule


@dataclass(frozen=True)
class FedDPDSettings:
    """The `feddpd:` YAML section (docs/DESIGN.md, "The server step")."""

    # -- when and how much (schedule.py); every supplement method reads these --
    schedule: str = "exponential"
    warmup_rounds: int = 1
    supplement_every: int = 20         # periodic only
    supplement_ratio: float = 0.5      # rho_0: supplement size / client sample count
    decay: float = 0.95                # exponential only: rho_t = rho_0 * decay ** (t - warmup_rounds)
    ratio_floor: float = 0.0           # exponential only: rho_t never falls below it
    supplement_weight: float = 1.0     # loss weight of a synthetic sample
    # when a client's supplement is replaced, the share of its previous one it keeps (a random subset, so the
    # supplement changes gradually; 0: replaced outright). Its size stays bounded: at most B / (1 - keep).
    keep_previous: float = 0.0
    # client: the client trains on its data plus the supplement; server: before aggregation the server trains
    # the client's uploaded model on it, so clients train and download exactly as under FedAvg. auto: the
    # method's own (methods.Method.delivery): server for FedDPD on an optimizer whose clients upload parameters,
    # client for the other supplement methods, as their papers deliver
    delivery: str = "auto"
    # -- what (selection.py, bank.py) --
    selection: str = "loss_gap"        # loss_gap (l_k - l_g > 0), discrepancy (older rule), random
    discrepancy: str = "prob_gap"      # selection: discrepancy only
    gate: str = "public"               # whose p(y|x) >= tau keeps a candidate: public (the server's classifier
    #                                    trained on its balanced public split) or global (the aggregated model)
    tau: Union[float, str] = "auto"    # auto: 1/C
    gate_epochs: int = 10              # gate: public: epochs of the server's classifier on the public split
    bank_per_class: int = 16           # base generator samples per class in the candidate bank
    bank_refresh: int = 0              # draw the base samples again every N rounds (0: once)
    # -- DPO (reward.py) --
    dpo: bool = True
    dpo_rounds: int = 0                # DPO runs in the first N supplement rounds only (0: never)
    pairs: str = "median"              # median: above / at-or-below the class median of the reward; quantile
    pair_quantile: float = 0.25        # pairs: quantile only
    disagreement_weight: float = 1.0   # lambda in the reward (l_k - l_g) + lambda * [argmax p_k != argmax p_g]
    adapter_samples: int = 32          # per client and DPO round: its adapter's samples added to the bank

    def due(self, round_idx: int, last_round: int) -> bool:
        """Supplement after aggregation of this round?"""
        return schedule.due(round_idx, last_round, self.schedule, self.warmup_rounds, self.supplement_every)

    def ratio(self, round_idx: int) -> float:
        return schedule.supply_ratio(round_idx, self.schedule, self.warmup_rounds, self.supplement_ratio,
                                     self.decay, self.ratio_floor)

    def dpo_due(self, round_idx: int) -> bool:
        """Train the adapters at this (due) round: DPO on, a scored selection, within the first dpo_rounds."""
        return (self.dpo and self.selection != "random" and self.dpo_rounds > 0
                and schedule.supplement_index(round_idx, self.schedule, self.warmup_rounds,
                                              self.supplement_every) < self.dpo_rounds)
