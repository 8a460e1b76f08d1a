"""Short LoRA DPO pilot fits: the evidence `weighting_scheme: auto` decides by (align.reuse.choose_weighting).

A pilot starts from the target (the model the run starts from, which is also the DPO reference), trains a fresh
LoRA adapter for `steps` AdamW steps on the pairs with weight > 0 (weighted DPO, effective batch of at least 32 pairs
so the weights survive the optimizer), and every `eval_every` steps scores held-out pairs of the target's own
version: their preference log-likelihood log σ(β·(h_c - h_r)) and, since their responses are samples of the target,
an unbiased estimate of KL(target ‖ π) = mean over those responses of log π_ref(y) - log π(y). The adapter is reset
between pilots and removed at the end, so the run then starts from the untouched target.

Every data-parallel rank runs the same pilots on the whole data (seeded, no sharding), so all ranks decide alike.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from align.losses import preference_loss
from align.models import apply_lora
from align.preference import completion_logps, to_device
from align.reuse import PilotFit

PILOT_BATCH = 32


class LoraPilot:
    """pilot(candidate, weights (N,), heldout) -> PilotFit, and agreement(old, new) for per-version trust."""

    def __init__(self, model: Any, features: Sequence[dict], ref: dict, collator: Any, beta: float, lora_args: Any,
                 steps: int, learning_rate: float, eval_batch: int = 16, seed: int = 0):
        self.features, self.collator, self.beta, self.steps, self.lr = features, collator, beta, steps, learning_rate
        self.ref = {k: ref[k].float() for k in ("chosen_logps", "rejected_logps")}
        self.eval_batch, self.seed = eval_batch, seed
        self.model = apply_lora(model, lora_args)
        self.device = next(self.model.parameters()).device
        self.start = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        self.eval_every = max(1, steps // 6)

    def _reset(self) -> None:
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in self.start:
                    param.copy_(self.start[name])

    def _logps(self, idx: torch.Tensor, grad: bool = False) -> dict:
        batch = to_device(self.collator([self.features[i] for i in idx.tolist()]), self.device)
        with torch.enable_grad() if grad else torch.no_grad():
            return completion_logps(self.model, batch)

    def _score(self, heldout: torch.Tensor) -> tuple[float, torch.Tensor]:
        """(KL estimate from the held-out responses, per-pair log σ(β·(h_c - h_r)))."""
        self.model.eval()
        parts, kl_terms = [], []
        for chunk in torch.split(heldout, self.eval_batch):
            out = self._logps(chunk)
            d_c = out["chosen_logps"].float().cpu() - self.ref["chosen_logps"][chunk]
            d_r = out["rejected_logps"].float().cpu() - self.ref["rejected_logps"][chunk]
            parts.append(torch.nn.functional.logsigmoid(self.beta * (d_c - d_r)))
            kl_terms.append(-torch.cat([d_c, d_r]))
        self.model.train()
        return max(0.0, float(torch.cat(kl_terms).mean())), torch.cat(parts).double()

    def fit(self, weights: torch.Tensor, heldout: torch.Tensor, final_only: bool = False) -> PilotFit:
        self._reset()
        rows = (weights > 0).nonzero().flatten()
        w = weights.float()
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        batch = min(PILOT_BATCH, len(rows))
        # At the start the policy is the reference: KL 0 and log σ(0) for every held-out pair, no pass needed.
        kls, lls = ([], []) if final_only else ([0.0], [torch.full((len(heldout),), -math.log(2), dtype=torch.float64)])
        self.model.train()
        for step in range(1, self.steps + 1):
            idx = rows[torch.randint(len(rows), (batch,), generator=gen)]
            out = self._logps(idx, grad=True)
            loss, _ = preference_loss(
                "sigmoid", out["chosen_logps"], out["rejected_logps"], self.ref["chosen_logps"][idx].to(self.device),
                self.ref["rejected_logps"][idx].to(self.device), self.beta, weights=w[idx].to(self.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if (not final_only and step % self.eval_every == 0) or step == self.steps:
                kl, ll = self._score(heldout)
                kls.append(kl)
                lls.append(ll)
        return PilotFit(kls, lls)

    def __call__(self, candidate: str, weights: torch.Tensor, heldout: torch.Tensor) -> PilotFit:
        return self.fit(weights, heldout)

    def agreement(self, old_idx: torch.Tensor, new_idx: torch.Tensor, folds: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_old, q_new): P(chosen ≻ rejected) under pilots fitted on the new pairs alone, cross-fitted for new."""
        order = new_idx[torch.randperm(len(new_idx), generator=torch.Generator().manual_seed(self.seed))]
        q_old = torch.zeros(len(old_idx), dtype=torch.float64)
        q_new = torch.zeros(len(self.features), dtype=torch.float64)
        for fold in torch.tensor_split(order, folds):
            weights = torch.zeros(len(self.features))
            weights[new_idx] = 1.0
            weights[fold] = 0.0
            fit = self.fit(weights, torch.cat([fold, old_idx]), final_only=True)
            q = torch.exp(fit.loglik[-1])
            q_new[fold] = q[:len(fold)]
            q_old += q[len(fold):] / folds
        return q_old, q_new[new_idx]

    def close(self) -> Any:
        """Remove the pilot adapter; returns the untouched target model."""
        return self.model.unload()


def pilot_budget(steps: int, candidates: int, folds: int = 2) -> int:
    """Optimizer steps all pilots take together (trust's agreement fits included)."""
    return steps * (candidates * folds + folds)

