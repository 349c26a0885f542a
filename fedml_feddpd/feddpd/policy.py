"""FedDPD's server step: the pure parts of this folder applied after each aggregation.

At a supplement round (schedule.py), with the round's global model and each client's upload:

1. **Bank.** Draw the base generator's candidates when the bank is stale (bank.py).
2. **DPO**, in the first `dpo_rounds` supplement rounds only: per client, preference pairs within the classes it
   lacks, split at the median of the reward (reward.py); every client's adapter trains in one joint Diffusion-DPO
   run; each adapter's samples join the bank and keep serving after DPO stops.
3. **Selection.** Score the bank with the global model, the gate's model and each upload (forward passes only),
   split the client's budget rho_t * n_k over classes by the mass of its positive loss gaps among gated candidates,
   and take the top candidates of each class (selection.py, allocation.py).

docs/DESIGN.md ("The server step") has the details and the options.
"""
from __future__ import annotations

import numpy as np

from ..supplement import SupplementPolicy
from .allocation import allocate_classes, largest_remainder, select_top
from .bank import CandidateBank
from .reward import dpo_reward, median_pairs, quantile_pairs
from .selection import discrepancy, loss_gap, quality_gate, resolve_tau


class FedDPDPolicy(SupplementPolicy):
    """Loss-gap-selected supplements from a re-scored candidate bank, with DPO-adapted generator samples."""

    def __init__(self, settings, data, seed: int):
        super().__init__(settings, data, seed)
        self.tau = resolve_tau(settings.tau, self.num_classes)
        self.bank = CandidateBank()
        # gate: public: the server's own classifier, trained on its balanced public split (real images the server
        # holds anyway), which recognises classes the long-tailed global model never predicts
        self.public = data.public if settings.gate == "public" and settings.selection != "random" else None
        self.gate_state = None
        self._gate_probs = (None, None)  # (bank version, the public classifier's probabilities on the bank)

    # -- the round -----------------------------------------------------------------------------------------
    def build_supplements(self, round_idx, global_state, uploads, scorer, generator, timer):
        s = self.settings
        rng = np.random.default_rng([self.seed, round_idx])
        budgets = {up.client_id: self.budget(up, round_idx) for up in uploads}
        dpo_now = s.dpo_due(round_idx) and any(budgets.values())
        if self.bank.stale(round_idx, s.bank_refresh) or dpo_now:
            with timer("pool"):
                x, y = generator.sample([s.bank_per_class] * self.num_classes, seed=int(rng.integers(2**31)))
            self.bank.set_base(x, y, round_idx)
        adapted = self._adapt(global_state, uploads, budgets, scorer, generator, timer, rng) if dpo_now else {}
        x, y, source = self.bank.candidates()
        labels = y.numpy()
        if s.selection == "random":
            return {up.client_id: self._random(x, y, budgets[up.client_id], rng) for up in uploads}
        with timer("scoring"):
            p_global, gate = self._global_view(global_state, x, labels, scorer)
        out = {}
        for up in timer.each_client(uploads):
            budget = budgets[up.client_id]
            with timer("scoring"):
                score = self._score(scorer.probs(up.state_dict, x), p_global, labels) if budget else None
                counts = (allocate_classes(score, labels, gate, budget, self.num_classes) if budget
                          else np.zeros(self.num_classes, int))
                # the loss-gap rule keeps only what the client does worse on (a class may get fewer than its share)
                eligible = gate & (score > 0) if budget and s.selection == "loss_gap" else gate
                pick = select_top(score, labels, eligible, counts) if budget else np.zeros(0, int)
            sup = out[up.client_id] = self._supplement(x[pick], y[pick], budget, counts)
            sup.stats.update(from_adapters=int((source[pick] >= 0).sum()), **adapted.get(up.client_id, {}))
        return out

    def _global_view(self, global_state, x, labels, scorer):
        """p_g on the candidates and the gate p(y|x) >= tau of the gate's model."""
        p_global = scorer.probs(global_state, x)
        if self.public is None:
            return p_global, quality_gate(p_global, labels, self.tau)
        if self._gate_probs[0] != self.bank.version:  # the public classifier is fixed: score each bank once
            self._gate_probs = (self.bank.version, scorer.probs(self._gate_model(scorer), x))
        return p_global, quality_gate(self._gate_probs[1], labels, self.tau)

    def _score(self, p_local, p_global, labels):
        s = self.settings
        if s.selection == "loss_gap":
            return loss_gap(p_local, p_global, labels)
        return discrepancy(p_global, p_local, labels, s.discrepancy)

    def _random(self, x, y, budget, rng):
        pick = rng.choice(len(y), size=min(budget, len(y)), replace=False)
        return self._supplement(x[pick], y[pick], budget, None)

    def _gate_model(self, scorer) -> dict:
        if self.gate_state is None:
            images, labels = self.public
            self.gate_state = scorer.fit(scorer.initial_state, images, labels, weight=1.0,
                                         seed=int(np.random.default_rng([self.seed, 1]).integers(2**31)),
                                         epochs=self.settings.gate_epochs)
        return self.gate_state

    # -- DPO -----------------------------------------------------------------------------------------------
    def _adapt(self, global_state, uploads, budgets, scorer, generator, timer, rng) -> dict:
        """Train every lacking client's adapter on preference pairs from the bank, then add its samples to the
        bank. Returns each trained client's DPO figures for its supplement's stats."""
        s = self.settings
        x, y, _ = self.bank.candidates()
        labels = y.numpy()
        with timer("scoring"):
            p_global, gate = self._global_view(global_state, x, labels, scorer)
        plans = {}
        for up in uploads:
            if not budgets[up.client_id]:
                continue
            with timer("scoring"):
                p_local = scorer.probs(up.state_dict, x)
                score = self._score(p_local, p_global, labels)
                counts = allocate_classes(score, labels, gate, budgets[up.client_id], self.num_classes)
                classes = np.flatnonzero(counts)
                if s.pairs == "median":
                    reward = dpo_reward(p_local, p_global, labels, s.disagreement_weight)
                    chosen, rejected = median_pairs(reward, labels, gate, classes, rng)
                else:
                    chosen, rejected = quantile_pairs(score, labels, gate, classes, s.pair_quantile, rng)
            if len(chosen):
                plans[up.client_id] = (chosen, rejected, largest_remainder(counts, s.adapter_samples),
                                       int(rng.integers(2**31)), int(rng.integers(2**31)))
        if not plans:
            return {}
        with timer("dpo"):
            trained = generator.train_adapters({_adapter(cid): (x[c], x[r], y[c], dpo_seed)
                                                for cid, (c, r, _, dpo_seed, _) in plans.items()})
        with timer("generation"):
            drawn = generator.sample_many({cid: (counts, gen_seed, _adapter(cid))
                                           for cid, (_, _, counts, _, gen_seed) in plans.items() if counts.sum()})
        for cid, (images, adapted_labels) in drawn.items():
            self.bank.set_adapted(cid, images, adapted_labels)
        return {cid: {"dpo_pairs": int(len(plans[cid][0])),
                      "dpo": {k: v for k, v in trained[_adapter(cid)].items() if isinstance(v, (int, float))}}
                for cid in plans}

    # -- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The bank and the public classifier (checkpoints hold them; a resumed run scores the same candidates)."""
        return {"bank": self.bank.state_dict(), "gate_state": self.gate_state}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"bank", "gate_state"}:
            raise ValueError(f"holds FedDPDPolicy state {sorted(state)}, expected ['bank', 'gate_state']")
        self.bank.load_state_dict(state["bank"])
        self.gate_state = state["gate_state"]


def _adapter(client_id: int) -> str:
    return f"client_{client_id}"

