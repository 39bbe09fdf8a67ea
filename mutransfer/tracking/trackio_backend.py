"""trackio: one trackio run per tracker run, local only (its database under ``$TRACKIO_DIR``,
by default ``~/.cache/huggingface/trackio``; ``trackio show --project <project>`` opens it).
Events are a marker scalar ``events/<name>`` at their step. trackio's notices go to stderr (a
command's stdout is its result)."""

from __future__ import annotations

import contextlib
import sys

from mutransfer.tracking.settings import require
from mutransfer.tracking.tracker import Tracker


class Backend(Tracker):
    name = "trackio"

    def start(self, run_name, group, config, run_id=None, resume_step=0):
        trackio = self.trackio = require("trackio")
        with contextlib.redirect_stdout(sys.stderr):
            self.run = trackio.init(project=self.settings.project, name=run_id or run_name, group=group,
                                    config=config, resume="allow" if run_id else "never", embed=False)
        if run_id is not None:
            last = trackio.SQLiteStorage.get_max_step_for_run(self.settings.project, self.run.name)
            self.skip_through = -1 if last is None else last
        return self.run.name

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def finish(self, failed=False):
        with contextlib.redirect_stdout(sys.stderr):
            self.trackio.finish()  # the current run (ours: one at a time), so it is not finished again at exit
