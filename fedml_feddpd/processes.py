"""Child processes that end with their parent (silo-local's parties, compare's workers)."""
from __future__ import annotations


def die_with_parent() -> None:
    """A child gets SIGTERM when its launcher dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG; elsewhere
    a no-op)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:
        pass
