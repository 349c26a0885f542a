"""FedDPD's idea as pure functions over arrays (no FedML, no diffusers)."""
from .allocation import allocate_classes, build_pairs, client_budget, largest_remainder, select_top
from .discrepancy import DISCREPANCIES, discrepancy, quality_gate
from .settings import FedDPDSettings

__all__ = ["DISCREPANCIES", "FedDPDSettings", "allocate_classes", "build_pairs", "client_budget", "discrepancy",
           "largest_remainder", "quality_gate", "select_top"]
