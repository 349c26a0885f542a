"""A client party's side of the MPI and gRPC backends (distributed.common re-exports ClientCore): its data, with
supplement delivery as on sp, what it reports of each round, and the state a resumed run gives back to it.
"""
from __future__ import annotations

import hashlib
import time
from typing import Optional

from ..experiment import Party


def supplement_digest(supplement) -> Optional[str]:
    """sha256 of a supplement's images and labels: the server and the client compute it on their own copies."""
    if supplement is None:
        return None
    h = hashlib.sha256(supplement.images.contiguous().numpy().tobytes())
    h.update(supplement.labels.contiguous().numpy().tobytes())
    return h.hexdigest()


def supplement_summary(supplement, num_classes: int) -> Optional[dict]:
    """Size, per-class counts and digest of a supplement (the server's log and the client's report match)."""
    if supplement is None:
        return None
    import numpy as np

    return {"size": int(len(supplement.labels)), "sha256": supplement_digest(supplement),
            "classes": np.bincount(supplement.labels.numpy(), minlength=num_classes).tolist()}


class ClientCore:
    """A client party's data: its real loaders (built from the seed like every rank's) and, for supplement
    methods, the delivery that replaces a client's loader when a supplement arrives, as on sp."""

    def __init__(self, party: Party):
        from ..trainer import SupplementDelivery

        self.party = party
        args = party.args
        self.last_seconds = 0.0  # the latest train() call's seconds (timed)
        self.loaders = party.data.fedml_dataset[5]  # the dict FedML's trainers read, replaced in place
        # sp reads every client's real tensors once before round 0 (SupplementDelivery): the clients here
        # do the same, so that both stay on the same shuffle stream.
        self.delivery = (SupplementDelivery(self.loaders, party.cfg.sections["feddpd"]["supplement_weight"],
                                            args.batch_size, int(args.random_seed), party.data.space)
                         if party.method.supplement else None)

    def deliver(self, cid: int, supplement) -> None:
        self.delivery(cid, supplement)

    def state_of(self, cid: int) -> dict:
        """What a resumed run needs of this client after its round (KEY_CLIENT_STATE): the loader's shuffle
        state (the round's epochs drew from it) and this process's torch RNG state. Neither holds data: both
        follow from the run seed and the rounds trained."""
        import torch

        generator = getattr(self.loaders[int(cid)], "generator", None)
        return {"loader": generator.get_state() if generator is not None else None, "torch": torch.get_rng_state()}

    def restore_state(self, cid: int, state: dict) -> None:
        """Put client `cid`'s loader (after its supplement was delivered) and this process's torch RNG where the
        checkpointed round left them."""
        import torch

        if state.get("loader") is not None:
            self.loaders[int(cid)].generator.set_state(state["loader"])
        if state.get("torch") is not None:
            torch.set_rng_state(state["torch"])

    def timed(self, train, announce=None):
        """Wrap a FedML trainer's `train(...)`: its seconds go into this client's next report (and to
        `announce(seconds)` when given)."""

        def timed_train(*a, **k):
            start = time.perf_counter()
            out = train(*a, **k)
            self.last_seconds = time.perf_counter() - start
            if announce is not None:
                announce(self.last_seconds)
            return out

        return timed_train

    def report(self, cid: int) -> dict:
        """What client `cid` trained on in the round it just trained, and for how long."""
        holding = self.delivery.holding.get(int(cid)) if self.delivery else None
        return {"client": int(cid), "seconds": self.last_seconds,
                "supplement": supplement_summary(holding, self.party.data.class_num)}
