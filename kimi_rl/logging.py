"""Run logging: TensorBoard event files and a console progress bar."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


class RunLogger:
    """Scalars and text to TensorBoard under <run_dir>/tb; progress bars on the console.
    On resume, events after `start` from the interrupted run are purged."""

    def __init__(self, run_dir: str | Path, start: int = 0, progress: bool = True):
        self.dir = Path(run_dir) / "tb"
        self.writer = SummaryWriter(str(self.dir), purge_step=start or None)
        self.phases: dict[str, SummaryWriter] = {}
        self.progress = progress
        self.bar: tqdm | None = None

    def start_bar(self, desc: str, total: int, initial: int = 0) -> tqdm:
        """A console progress bar for the next phase (replaces the previous one)."""
        if self.bar is not None:
            self.bar.close()
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not self.progress,
                        dynamic_ncols=True, leave=True)
        return self.bar

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def phase_scalars(self, phase: str, metrics: dict[str, float], step: int) -> None:
        """Scalars of a phase before RL (the SFT cold start), by that phase's own step, in
        <run_dir>/tb/<phase>: a resumed RL run purges its own events, not these."""
        if phase not in self.phases:
            self.phases[phase] = SummaryWriter(str(self.dir / phase))
        for k, v in metrics.items():
            self.phases[phase].add_scalar(k, v, step)

    def histogram(self, tag: str, values, step: int) -> None:
        self.writer.add_histogram(tag, np.asarray(values), step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def step(self, postfix: dict[str, float]) -> None:
        """End of an iteration: its events reach the disk (before the loop may checkpoint,
        so a run killed after a checkpoint keeps the events the checkpoint covers)."""
        self.writer.flush()
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(1)

    def print(self, msg: str) -> None:
        tqdm.write(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
        for w in self.phases.values():
            w.close()
