"""Stop a run whose loss or gradients stop being finite, and never save weights that are not finite.

A learning rate typed as 1e4 instead of 1e-4 turns every weight into NaN within a step or two; without a guard
the run still "finishes" and saves a model that breaks whatever loads it next. Every loop (ours for DPO and the
reward model, TRL's for SFT and RLHF through `NonFiniteCallback`) asks `NonFiniteGuard.check` before each
optimizer update: a non-finite step is skipped (its gradients dropped, counted as `train/skipped_steps`), and
after MAX_BAD_STEPS of them in a row, or if the last step was one, the run stops with one line naming the step
and the likely cause.
`check_weights` runs before every checkpoint and before the final save.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Optional

import torch

from align.errors import AlignError

log = logging.getLogger(__name__)

MAX_BAD_STEPS = 3  # consecutive non-finite steps skipped before the run stops: one bad batch is survivable


class TrainingDiverged(AlignError):
    """The loss, the gradients or the weights stopped being finite; nothing is saved."""


def likely_cause(learning_rate: float) -> str:
    if not math.isfinite(learning_rate) or learning_rate >= 0.1:
        return f"the learning rate {learning_rate:g} is far too high (LoRA runs use about 1e-5 to 1e-3)"
    return (f"the learning rate {learning_rate:g} may be too high for this model, or a float16 overflow "
            "(try bfloat16 or float32)")


class NonFiniteGuard:
    """Decides, step by step, whether an update is applied, skipped, or ends the run."""

    def __init__(self, learning_rate: float, max_bad_steps: int = MAX_BAD_STEPS):
        self.learning_rate = learning_rate
        self.max_bad_steps = max_bad_steps
        self.skipped = 0  # over the whole run (this process): logged as train/skipped_steps
        self.in_a_row = 0

    def check(self, step: int, grad_norm: float, loss: Optional[float] = None) -> bool:
        """True: apply step `step` (1-based). False: skip it. Raises TrainingDiverged after too many in a row."""
        if math.isfinite(grad_norm) and (loss is None or math.isfinite(loss)):
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        what = f"gradient norm {grad_norm:g}" if loss is None else f"loss {loss:g}, gradient norm {grad_norm:g}"
        if self.in_a_row > self.max_bad_steps:
            raise TrainingDiverged(
                f"training stopped at step {step}: {self.in_a_row} steps in a row had a non-finite loss or gradient "
                f"({what}); likely cause: {likely_cause(self.learning_rate)}. No model was saved")
        log.warning("step %d: non-finite loss or gradient (%s); update skipped (%d of %d allowed in a row)", step,
                    what, self.in_a_row, self.max_bad_steps)
        return False

    def finish(self, step: int) -> None:
        """A run may skip a few bad steps, but not end on them: it never recovered."""
        if self.in_a_row:
            raise TrainingDiverged(
                f"training stopped at step {step}: its last {self.in_a_row} steps had a non-finite loss or gradient "
                f"and were skipped; likely cause: {likely_cause(self.learning_rate)}. No model was saved")


def nonfinite_names(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of floating-point tensors holding a NaN or an infinity."""
    return [name for name, t in named_tensors
            if torch.is_floating_point(t) and t.numel() and not bool(torch.isfinite(t.detach()).all())]


def trainable_nonfinite(model: Any) -> list[str]:
    return nonfinite_names((n, p) for n, p in model.named_parameters() if p.requires_grad)


def check_weights(model: Any, step: Optional[int], learning_rate: Optional[float],
                  state_dict: Optional[dict] = None) -> None:
    """Raise TrainingDiverged if any trainable weight (or any entry of `state_dict`) is not finite."""
    bad = nonfinite_names(state_dict.items()) if state_dict is not None else trainable_nonfinite(model)
    if bad:
        raise diverged_weights(bad, step, learning_rate)


def diverged_weights(bad: list[str], step: Optional[int], learning_rate: Optional[float]) -> TrainingDiverged:
    at = f"stopped at step {step}" if step is not None else "ended"
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    cause = f"; likely cause: {likely_cause(learning_rate)}" if learning_rate is not None else ""
    return TrainingDiverged(f"training {at} with weights that are not finite ({bad[0]}{more}){cause}. "
                            "No model was saved")


def grad_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    """The global L2 norm of the gradients present (NaN or inf if any gradient is)."""
    grads = [p.grad.detach().float() for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def non_finite_callback(learning_rate: float) -> Any:
    """A transformers TrainerCallback applying the guard inside Trainer's loop (SFT, RLHF)."""
    from transformers import TrainerCallback

    class NonFiniteCallback(TrainerCallback):
        def __init__(self) -> None:
            self.guard = NonFiniteGuard(learning_rate)

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            # Runs after clipping, before optimizer.step(): dropping every gradient makes AdamW skip the update.
            # The norm is global (gradients are already synchronised across ranks), so every rank decides alike.
            params = [p for p in model.parameters() if p.requires_grad]
            if not self.guard.check(state.global_step + 1, grad_norm(params)):
                for p in params:
                    p.grad = None

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if control.should_save or control.should_training_stop:  # nothing non-finite reaches a checkpoint
                check_weights(model, state.global_step, learning_rate)

        def on_train_end(self, args, state, control, **kwargs):
            self.guard.finish(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None and "loss" in logs:
                logs["train/skipped_steps"] = self.guard.skipped

    return NonFiniteCallback()
