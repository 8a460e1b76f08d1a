"""The overfitting alarm: held-out loss against training loss, in every run that evaluates a loss.

At each evaluation, `eval_gap` = eval_loss − the mean training loss of the optimizer steps since the previous
evaluation. A constant gap is not the alarm (DPO's training loss carries importance weights and an SFT term that its
evaluation loss does not, so the two differ by design); a gap that widens evaluation after evaluation is: the model
is fitting its training pairs at the expense of held-out ones. The alarm is logged as a warning, written into
metrics.jsonl (`overfit/widening`: consecutive widenings) and into version.json (`overfit_alarm`), and the report's
training section shows the gaps. When early stopping ends a run, `stop_reason` says why.

Used by align.trainers.loop (DPO, reward model) and, through `OverfitCallback`, by TRL's SFT trainer. RLHF has no
held-out loss (its evaluation is the gold reward, which the reward-hacking monitor watches).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

log = logging.getLogger(__name__)


@dataclass
class GapTracker:
    """Feed it training losses (add_train) and evaluation losses (add_eval); it keeps the gap history.

    window: consecutive widenings of the gap that raise the alarm (0: never).
    """

    window: int = 3
    history: list[dict] = field(default_factory=list)  # {step, train_loss, eval_loss, eval_gap}
    alarm: Optional[str] = None
    stop_reason: Optional[str] = None
    _losses: list[tuple[float, int]] = field(default_factory=list)  # (mean loss, optimizer steps) since last eval
    _last_train: Optional[float] = None

    def add_train(self, loss: float, steps: int = 1) -> None:
        if loss is not None and math.isfinite(loss):
            self._losses.append((float(loss), max(1, int(steps))))

    def add_eval(self, step: int, eval_loss: float) -> dict[str, float]:
        """The metrics to log beside eval_loss: eval_gap, eval_train_loss (the window's mean) and overfit/widening.
        A second evaluation at the same step (a final evaluate() after training) is not a new point."""
        if self.history and self.history[-1]["step"] == step:
            last = self.history[-1]
            return {"eval_gap": last["eval_gap"], "eval_train_loss": last["train_loss"],
                    "overfit/widening": self.widening()}
        if self._losses:
            total = sum(n for _, n in self._losses)
            self._last_train = sum(loss * n for loss, n in self._losses) / total
        self._losses = []
        if self._last_train is None or eval_loss is None or not math.isfinite(eval_loss):
            return {}
        gap = float(eval_loss) - self._last_train
        self.history.append({"step": step, "train_loss": self._last_train, "eval_loss": float(eval_loss),
                             "eval_gap": gap})
        widening = self.widening()
        if self.window and widening >= self.window and self.alarm is None and gap > 0:
            first = self.history[-1 - widening]
            self.alarm = (f"overfitting at step {step}: the held-out minus training loss gap widened for {widening} "
                          f"evaluations in a row ({first['eval_gap']:+.4f} at step {first['step']} to {gap:+.4f}; "
                          f"eval loss {eval_loss:.4f}, training loss {self._last_train:.4f}). Fewer steps, a lower "
                          "learning rate, more data or early_stopping_patience would stop it.")
            log.warning(self.alarm)
        return {"eval_gap": gap, "eval_train_loss": self._last_train, "overfit/widening": widening}

    def widening(self) -> int:
        """How many evaluations in a row the gap has grown (0 when the last one did not)."""
        count = 0
        for before, after in zip(reversed(self.history[:-1]), reversed(self.history)):
            if after["eval_gap"] > before["eval_gap"]:
                count += 1
            else:
                break
        return count

    def early_stop(self, step: int, patience: int, best: float, best_step: Optional[int]) -> str:
        """Record (and return) why early stopping ended the run."""
        where = f" at step {best_step}" if best_step is not None else ""
        reason = (f"early stopping at step {step}: eval_loss did not improve for {patience} evaluation(s) "
                  f"(best {best:.4f}{where})")
        if self.history:
            last = self.history[-1]
            reason += f"; eval − train loss gap {last['eval_gap']:+.4f}"
            if self.alarm:
                reason += ", widening (overfitting)"
        self.stop_reason = reason
        log.info(reason)
        return reason

    def summary(self) -> dict[str, Any]:
        """What version.json keeps: the last gap, the alarm and the stop reason when there are any."""
        out: dict[str, Any] = {}
        if self.history:
            out["eval_gap"] = self.history[-1]["eval_gap"]
            out["eval_gap_max"] = max(h["eval_gap"] for h in self.history)
        if self.alarm:
            out["overfit_alarm"] = self.alarm
        if self.stop_reason:
            out["stop_reason"] = self.stop_reason
        return out


def gap_rows(rows: list[dict]) -> list[dict]:
    """The evaluations of a metrics.jsonl that carry a gap: {step, train_loss, eval_loss, eval_gap}, one per step
    (a final evaluate() after training repeats the last step's)."""
    by_step = {r.get("step"): {"step": r.get("step"), "train_loss": r.get("eval_train_loss"),
                               "eval_loss": r.get("eval_loss"), "eval_gap": r["eval_gap"]}
               for r in rows if isinstance(r.get("eval_gap"), (int, float))}
    return list(by_step.values())


def callback(tracker: GapTracker, patience: int):
    """A transformers TrainerCallback feeding the tracker from the trainer's logs (SFT through TRL).

    It must run before the callback that writes metrics.jsonl: it adds eval_gap to the same logs dict. With
    patience > 0 it also does transformers' early stopping, saying why it stopped.
    """
    from transformers import TrainerCallback

    class OverfitCallback(TrainerCallback):
        def __init__(self):
            self.last_step = 0
            self.best, self.best_step, self.bad = math.inf, None, 0

        def on_step_end(self, args, state, control, **kwargs):
            if control.should_evaluate:  # an evaluation's gap needs the training loss of the same window
                control.should_log = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs:
                return
            if "loss" in logs and "eval_loss" not in logs:
                tracker.add_train(float(logs["loss"]), state.global_step - self.last_step)
                self.last_step = state.global_step
            if "eval_loss" in logs:
                logs.update(tracker.add_eval(state.global_step, float(logs["eval_loss"])))

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            loss = (metrics or {}).get("eval_loss")
            if patience <= 0 or loss is None:
                return
            if loss < self.best:
                self.best, self.best_step, self.bad = loss, state.global_step, 0
            else:
                self.bad += 1
            if self.bad >= patience:
                control.should_training_stop = True
                tracker.early_stop(state.global_step, patience, self.best, self.best_step)

    return OverfitCallback()
