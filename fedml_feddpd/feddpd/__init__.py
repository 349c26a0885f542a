"""FedDPD, the method, in one folder.

Pure functions over arrays, tested without FedML or diffusers:
  schedule.py    when the server supplies data and how much (exponential decay or periodic)
  selection.py   which candidates a client lacks (the loss gap l_k - l_g, or the older discrepancy) and the gate
  allocation.py  a client's budget, its split over classes, the top candidates of each class
  reward.py      DPO's reward (l_k - l_g) + lambda * disagreement and its median-split preference pairs
  settings.py    the `feddpd:` YAML section
State and the round's work:
  bank.py        the candidate bank the server scores every supplement round
  policy.py      FedDPDPolicy: applies all of the above after each aggregation (imports torch, not FedML)

docs/DESIGN.md ("The server step") walks through a round.
"""
from .allocation import allocate_classes, client_budget, largest_remainder, select_top, take_per_class
from .reward import PAIRINGS, dpo_reward, median_pairs, quantile_pairs
from .schedule import SCHEDULES, due, supplement_index, supply_ratio
from .selection import (DISCREPANCIES, GATES, SELECTIONS, cross_entropy, discrepancy, loss_gap, quality_gate,
                        resolve_tau)
from .settings import FedDPDSettings

__all__ = ["DISCREPANCIES", "GATES", "PAIRINGS", "SCHEDULES", "SELECTIONS", "FedDPDSettings", "allocate_classes",
           "client_budget", "cross_entropy", "discrepancy", "dpo_reward", "due", "largest_remainder", "loss_gap",
           "median_pairs", "quality_gate", "quantile_pairs", "resolve_tau", "select_top", "supplement_index",
           "supply_ratio", "take_per_class"]
