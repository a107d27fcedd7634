"""What a goodput policy measured of its own steps, and the guard it draws from them.

`margin`: the least predicted gain over no speculation that makes goodput speculate, the
step-time model's recent mean absolute error on the steps it chose (within MIN_MARGIN and
MAX_MARGIN). A gain the model cannot tell from its own error is a coin toss, and near
saturation on a CPU the coin was loaded: once the Ray output stream was batched (twenty-sixth
session) `off`'s steps got cheaper, and speculating at batch 20, predicted to gain a few per
cent, lost 5-18% mean latency to `off` at 8 and 32 req/s (its steps' costs under-predicted, the
queue's wait not in the objective at all). At light load the predicted gain is 30-60%.
(A second guard, a floor on what a second of a step carrying a prompt chunk is worth, is gone:
GoodputPolicy.choose prices such a step as its decodes alone.)
"""

from __future__ import annotations

from goodspec.scheduler.step_record import StepRecord


class StepEvidence:
    MIN_MARGIN, MAX_MARGIN = 0.02, 0.2
    MARGIN_STEPS = 200  # predictions the error is taken over
    LOG_STEPS = 1000  # (predicted, measured) pairs kept, for the stats

    def __init__(self) -> None:
        self.prediction_log: list[tuple[float, float]] = []  # (predicted, measured) step seconds
        self.margin = self.MIN_MARGIN

    def log(self, predicted: float | None, record: StepRecord) -> None:
        """The step the policy predicted has run: only pure decode batches are what the
        prediction was made for."""
        if predicted is not None and record.num_decode == record.batch_size:
            self.prediction_log.append((predicted, record.draft_time + record.verify_time))
            del self.prediction_log[:-self.LOG_STEPS]

    def update(self) -> None:
        """Recompute the margin (with each refit of the step-time model)."""
        log = self.prediction_log[-self.MARGIN_STEPS:]
        if len(log) >= 20:
            err = sum(abs(p - m) / max(m, 1e-9) for p, m in log) / len(log)
            self.margin = min(self.MAX_MARGIN, max(self.MIN_MARGIN, err))
