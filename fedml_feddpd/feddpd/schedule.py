"""When the server supplies data and how much: pure functions of the round index.

* `exponential` (the paper's schedule): a supplement after every round from `warmup_rounds` on, its size
  ratio rho_t = supplement_ratio * decay ** (t - warmup_rounds), never below `ratio_floor`: more early, less
  later.
* `periodic`: a supplement every `supplement_every` rounds from `warmup_rounds` on, always at
  `supplement_ratio`.

Never after the last round: nobody would train on it.
"""
from __future__ import annotations

SCHEDULES = ("exponential", "periodic")


def due(round_idx: int, last_round: int, schedule: str, warmup_rounds: int, supplement_every: int) -> bool:
    if round_idx < warmup_rounds or round_idx >= last_round:
        return False
    if schedule == "exponential":
        return True
    if schedule == "periodic":
        return (round_idx - warmup_rounds) % supplement_every == 0
    raise ValueError(f"feddpd.schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")


def supply_ratio(round_idx: int, schedule: str, warmup_rounds: int, supplement_ratio: float, decay: float,
                 ratio_floor: float) -> float:
    """rho_t: the supplement's size as a share of the client's sample count, at a due round."""
    if schedule == "periodic":
        return supplement_ratio
    return max(supplement_ratio * decay ** max(round_idx - warmup_rounds, 0), ratio_floor)


def supplement_index(round_idx: int, schedule: str, warmup_rounds: int, supplement_every: int) -> int:
    """How many supplement rounds came before this due round (0 at the first)."""
    step = 1 if schedule == "exponential" else supplement_every
    return (round_idx - warmup_rounds) // step
