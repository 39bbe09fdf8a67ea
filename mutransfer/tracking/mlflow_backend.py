"""MLflow: one MLflow run per tracker run, in the experiment ``tracking.project``, tagged ``group``.

The tracking URI is ``tracking.mlflow_uri``, else ``$MLFLOW_TRACKING_URI``, else a sqlite database
``mlflow.db`` in the run directory (``mlflow ui --backend-store-uri sqlite:///<run dir>/mlflow.db``
shows it). The config goes in as params (flattened ``a.b`` keys), events as a marker metric plus
a tag ``event.<step>.<name>`` holding their data. Metrics are sent in batches (every
``FLUSH_EVERY`` values or ``FLUSH_SECONDS``, and at the end). A resumed training run continues
the same MLflow run and skips the steps it already holds (a resume repeats them exactly).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from mutransfer.tracking.settings import TrackingSettings, require
from mutransfer.tracking.tracker import Tracker, as_text, flat_config

FLUSH_EVERY = 500  # metric values per batch (MLflow takes at most 1000)
FLUSH_SECONDS = 10.0
MAX_PARAMS = 100  # params per batch (MLflow's limit)
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
MAX_TAG_CHARS = 8000


def tracking_uri(settings: TrackingSettings, root: Path) -> str:
    if settings.mlflow_uri:
        return settings.mlflow_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(root) / 'mlflow.db').resolve()}"


def key(name: str) -> str:
    """A metric or param name MLflow accepts (letters, digits, ``_ - . / : space``)."""
    return re.sub(r"[^\w./\- :]", "_", name)


def _client(settings: TrackingSettings, root: Path):
    require("mlflow")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri(settings, root))


def experiment_id(client, settings: TrackingSettings, root: Path) -> str:
    """The experiment ``settings.project``, created when missing (a local store keeps its artifacts
    in the run directory, not in the working directory)."""
    found = client.get_experiment_by_name(settings.project)
    if found is not None:
        return found.experiment_id
    uri = tracking_uri(settings, root)
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    location = (Path(root) / "mlartifacts").resolve().as_uri() if local else None
    try:
        return client.create_experiment(settings.project, artifact_location=location)
    except Exception:  # another process created it meanwhile
        found = client.get_experiment_by_name(settings.project)
        if found is None:
            raise
        return found.experiment_id


def prepare(settings: TrackingSettings, root: Path) -> None:
    """The store and the experiment, once, before worker processes open runs in it."""
    Path(root).mkdir(parents=True, exist_ok=True)
    experiment_id(_client(settings, root), settings, root)


class Backend(Tracker):
    name = "mlflow"

    def start(self, run_name, group, config, run_id=None, resume_step=0):
        from mlflow.entities import Param, RunTag

        self.root.mkdir(parents=True, exist_ok=True)
        self.client = _client(self.settings, self.root)
        self.pending, self.flushed_at = [], time.monotonic()
        if run_id is not None:  # continue it: the steps it holds are not sent again
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            self.skip_through = self._last_step()
            return run_id
        exp = experiment_id(self.client, self.settings, self.root)
        run = self.client.create_run(exp, run_name=run_name, tags={"group": group})
        self.run_id = run.info.run_id
        params = [Param(key(k), v[:MAX_PARAM_CHARS]) for k, v in flat_config(config).items()]
        for i in range(0, len(params), MAX_PARAMS):
            self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS])
        self.client.log_batch(self.run_id, tags=[RunTag("config", as_text(config)[:MAX_TAG_CHARS])])
        return self.run_id

    def _last_step(self) -> int:
        metrics = self.client.get_run(self.run_id).data.metrics
        if not metrics:
            return -1
        name = "loss" if "loss" in metrics else sorted(metrics)[0]
        return max((m.step for m in self.client.get_metric_history(self.run_id, name)), default=-1)

    def log(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(key(k), v, now, step) for k, v in metrics.items()]
        if len(self.pending) >= FLUSH_EVERY or time.monotonic() - self.flushed_at > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:FLUSH_EVERY], self.pending[FLUSH_EVERY:]
            self.client.log_batch(self.run_id, metrics=batch)
        self.flushed_at = time.monotonic()

    def event(self, name, data, step):
        super().event(name, data, step)
        self.client.set_tag(self.run_id, key(f"event.{step:08d}.{name}"), as_text(data)[:MAX_TAG_CHARS])

    def finish(self, failed=False):
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
