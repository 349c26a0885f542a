"""Generative baselines for FedDPD: each differs from FedDPD only in how the supplement is chosen.

FedAvg and FedProx are FedML's own implementations and need nothing here.
"""
from .balance import BalancePolicy
from .feddiff import FedDiffPolicy
from .oracle import OraclePolicy

__all__ = ["BalancePolicy", "FedDiffPolicy", "OraclePolicy"]
