"""Run logging: TensorBoard event files and a console progress bar."""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


class RunLogger:
    """Scalars and text to TensorBoard under <run_dir>/tb; a tqdm bar on the console.
    On resume, events after `start` from the interrupted run are purged."""

    def __init__(self, run_dir: str | Path, total: int, start: int = 0, progress: bool = True):
        self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start or None)
        self.bar = tqdm(total=total, initial=start, disable=not progress, desc="rl",
                        dynamic_ncols=True)

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def step(self, postfix: dict[str, float]) -> None:
        """End of an iteration: its events reach the disk (before the loop may checkpoint,
        so a run killed after a checkpoint keeps the events the checkpoint covers)."""
        self.writer.flush()
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in postfix.items()}, refresh=False)
        self.bar.update(1)

    def print(self, msg: str) -> None:
        self.bar.write(msg)

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
