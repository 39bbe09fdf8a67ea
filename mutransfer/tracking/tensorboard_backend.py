"""TensorBoard: one event directory per tracker run, ``<run dir>/tensorboard/<run name>``.

``tensorboard --logdir <run dir>/tensorboard`` shows a sweep's trials (or a check's grid points)
side by side. The config is stored as text, each event as text at its step. A resumed training run
purges what the directory holds (TensorBoard hides it) and is sent again from its files.
"""

from __future__ import annotations

import re

from mutransfer.tracking.settings import require
from mutransfer.tracking.tracker import Tracker, as_text


def logdir_name(run_name: str) -> str:
    """The run name as one directory name."""
    return re.sub(r"[^\w.=+-]+", "_", run_name).strip("_") or "run"


def _code(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())  # a Markdown code block


class Backend(Tracker):
    name = "tensorboard"

    def start(self, run_name, group, config, run_id=None, resume_step=0):
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = self.root / "tensorboard" / logdir_name(run_name)
        self.writer = SummaryWriter(log_dir=str(self.logdir), purge_step=0 if resume_step else None)
        self.writer.add_text("config", _code(as_text({"run": run_name, "group": group, **config})), 0)
        return None

    def log(self, metrics, step):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def event(self, name, data, step):
        super().event(name, data, step)
        self.writer.add_text(f"events/{name}", _code(as_text(data)), step)

    def finish(self, failed=False):
        self.writer.close()
