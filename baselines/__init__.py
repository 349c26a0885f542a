"""Generative baselines for FedDPD: each differs from FedDPD only in how the supplement is chosen.

FedAvg and FedProx are FedML's own implementations and need nothing here. FedLC (baselines/fedlc.py) and
FedRS (baselines/fedrs.py) are client trainers (FedML ModelTrainerCLS subclasses), not supplement policies;
the registry imports them by name when a run needs them, so importing this package does not load FedML.
"""
from .balance import BalanceBudgetPolicy, BalancePolicy
from .feddiff import FedDiffPolicy
from .oracle import OraclePolicy

__all__ = ["BalanceBudgetPolicy", "BalancePolicy", "FedDiffPolicy", "OraclePolicy"]
