"""Preemption: SIGUSR1/SIGTERM -> finish the step -> every rank agrees -> save -> exit 42.

SLURM (and most schedulers) send SIGUSR1 or SIGTERM some time before they kill a job. Dying at once
loses the work since the last checkpoint; instead the signal is remembered, and at the next check
(every ``check_every_n_steps`` optimizer steps, and at every epoch end) the ranks agree through one
collective whether any of them was signalled, save a training-state checkpoint together and stop
with :class:`TrainingPreempted`, which the CLI turns into exit code 42 ("requeue me").
"""

from __future__ import annotations

import signal
import threading
import warnings
from pathlib import Path

from .callbacks import Callback, RunState
from .distributed import any_rank

PREEMPTED_EXIT_CODE = 42
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class TrainingPreempted(Exception):
    """Training stopped on SIGUSR1/SIGTERM after saving a checkpoint; rerun with resume to continue."""

    def __init__(self, checkpoint: Path, signal_name: str):
        super().__init__(f"stopped by {signal_name}; state saved in {checkpoint}; resume with --resume latest")
        self.checkpoint = checkpoint


class StopSignals:
    """Remember SIGUSR1/SIGTERM instead of dying, so the step can finish and a checkpoint be written."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("finetune() runs outside the main thread: Python delivers signals to the main thread "
                          "only, so SIGUSR1/SIGTERM will not checkpoint and stop this run (preemption "
                          "handling is off)", RuntimeWarning, stacklevel=2)
            return self
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class Preemption(Callback):
    """Checks for stop signals every ``check_every_n_steps`` steps and at epoch ends; saves and stops."""

    def __init__(self, check_every_n_steps: int = 10):
        self.check_every_n_steps = check_every_n_steps
        self.signals = StopSignals()

    def on_fit_start(self, trainer, run: RunState) -> None:
        self.signals.__enter__()

    def on_step_end(self, trainer, run: RunState) -> None:
        if run.position.global_step % self.check_every_n_steps == 0:
            self._stop_if_signalled(trainer, run)

    def on_epoch_end(self, trainer, run: RunState, record: dict) -> None:
        self._stop_if_signalled(trainer, run)

    def teardown(self, trainer, run: RunState) -> None:
        self.signals.__exit__()

    def _stop_if_signalled(self, trainer, run: RunState) -> None:
        if not any_rank(run.accelerator, self.signals.received is not None):
            return
        name = signal.Signals(self.signals.received).name if self.signals.received else "a peer rank"
        if run.output_dir is None:
            raise TrainingPreempted(Path("(nowhere: no output_dir)"), name)
        raise TrainingPreempted(trainer.save_training_state(run), name)
