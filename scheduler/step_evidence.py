"""What a goodput policy measured of its own steps, and the two guards it draws from them.

- `margin`: the least predicted gain over no speculation that makes goodput speculate, the
  step-time model's recent mean absolute error on the steps it chose (within MIN_MARGIN and
  MAX_MARGIN). A gain the model cannot tell from its own error is a coin toss, and near
  saturation on a CPU the coin was loaded: once the Ray output stream was batched (twenty-sixth
  session) `off`'s steps got cheaper, and speculating at batch 20, predicted to gain a few per
  cent, lost 5-18% mean latency to `off` at 8 and 32 req/s (its steps' costs under-predicted,
  the queue's wait not in the objective at all). At light load the predicted gain is 30-60%.
- `decode_level`: tokens per second of the recent steps without prompt chunks, measured: what a
  second of a step that carries a chunk is worth at least (best_choice's floor). Priced beside
  the chunk alone, speculation looked cheap there: at saturation goodput drafted 8-70 tokens
  into such steps, and those steps took 15-60% longer than `off`'s.
"""

from __future__ import annotations

from goodspec.scheduler.step_record import StepRecord


class StepEvidence:
    MIN_MARGIN, MAX_MARGIN = 0.02, 0.2
    MARGIN_STEPS = 200  # predictions the error is taken over
    LEVEL_STEPS = 64  # steps without prompt chunks that decode_level is measured over
    LOG_STEPS = 1000  # (predicted, measured) pairs kept, for the stats

    def __init__(self) -> None:
        self.prediction_log: list[tuple[float, float]] = []  # (predicted, measured) step seconds
        self.margin = self.MIN_MARGIN
        self.decode_level = 0.0

    def log(self, predicted: float | None, record: StepRecord) -> None:
        """The step the policy predicted has run: only pure decode batches are what the
        prediction was made for."""
        if predicted is not None and record.num_decode == record.batch_size:
            self.prediction_log.append((predicted, record.draft_time + record.verify_time))
            del self.prediction_log[:-self.LOG_STEPS]

    def floor(self, prefill_tokens: int) -> float:
        """best_choice's floor for a step with this many prompt-chunk tokens."""
        return self.decode_level if prefill_tokens else 0.0

    def update(self, records: list[StepRecord]) -> None:
        """Recompute both guards (with each refit of the step-time model)."""
        log = self.prediction_log[-self.MARGIN_STEPS:]
        if len(log) >= 20:
            err = sum(abs(p - m) / max(m, 1e-9) for p, m in log) / len(log)
            self.margin = min(self.MAX_MARGIN, max(self.MIN_MARGIN, err))
        tokens = seconds = 0.0
        n = 0
        for r in reversed(records):
            if r.num_decode == r.batch_size:
                tokens += r.num_decode + r.num_accepted
                seconds += r.draft_time + r.verify_time
                n += 1
                if n == self.LEVEL_STEPS:
                    break
        self.decode_level = tokens / seconds if seconds > 0 else 0.0
