"""Weights & Biases: one W&B run per tracker run, in the project of ``tracking.project``, grouped.

Local files go to ``<run dir>/wandb`` (``wandb.init(dir=...)``). ``tracking.wandb_mode`` (else
``$WANDB_MODE``) picks online, offline (``wandb sync`` uploads later) or disabled. Events are a
marker scalar ``events/<name>`` at their step, and their latest data in the run summary
(``event_data/<name>``). A resumed training run continues the same W&B run (its id is kept in
the run directory) from the step W&B holds (offline: a new offline run directory with the same
id gets every step again).
"""

from __future__ import annotations

from mutransfer.tracking.settings import require
from mutransfer.tracking.tracker import Tracker


class Backend(Tracker):
    name = "wandb"

    def start(self, run_name, group, config, run_id=None, resume_step=0):
        wandb = require("wandb")
        s = self.settings
        self.root.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=s.project, entity=s.wandb_entity, group=group, name=run_name, config=config,
                              dir=str(self.root), mode=s.wandb_mode, id=run_id, resume="allow" if run_id else None,
                              settings=wandb.Settings(console="off"))  # the files and the terminal keep the logs
        if run_id is not None:
            self.skip_through = self.run.step - 1  # W&B refuses steps below the one it is at
        return self.run.id

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def event(self, name, data, step):
        super().event(name, data, step)
        self.run.summary[f"event_data/{name}"] = data  # "events/<name>" is the marker's

    def finish(self, failed=False):
        self.run.finish(exit_code=1 if failed else 0)
