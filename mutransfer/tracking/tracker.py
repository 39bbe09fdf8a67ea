"""One metrics sink for every command: ``Tracking`` fans a run's scalars and events out to the chosen backends.

A command opens one ``Tracking`` per tracker run (a training run, a sweep trial, a grid point of a
transfer or coordinate check)::

    with Tracking(settings, out_dir) as tracking:
        tracking.start("trial-0003", group="quickstart", config={...})
        tracking.log({"loss": 3.1, "lr": {"hidden": 0.01}}, step)   # nested dicts become "lr/hidden"
        tracking.event("switch", {"to": "muon"}, step)

``step`` is the 0-based index of the optimizer update, as in metrics.jsonl. Each backend lives in
its own module (``mutransfer.tracking.<name>_backend``), imported only when chosen. A backend that
fails while logging is reported once on stderr and dropped: the run's files are the record, the
tracker is an extra sink, and a lost connection must not end a long run.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from mutransfer.config import ConfigError
from mutransfer.tracking.settings import TrackingSettings

# What to try when a backend cannot open its run.
HINTS = {"wandb": " (log in with `wandb login` or WANDB_API_KEY, or run without a server: "
                  "tracking.wandb_mode = \"offline\" or WANDB_MODE=offline)",
         "mlflow": " (check tracking.mlflow_uri / $MLFLOW_TRACKING_URI)"}


class Tracker:
    """One backend's side of one tracker run; the backend modules subclass it as ``Backend``."""

    name = ""

    def __init__(self, settings: TrackingSettings, root: Path):
        self.settings, self.root = settings, Path(root)
        self.skip_through = -1  # a continued run: the last step the backend already holds (not sent again)

    def start(self, run_name: str, group: str, config: dict, run_id: str | None = None, resume_step: int = 0
              ) -> str | None:
        """Open the run (``run_id``: continue that run; ``resume_step``: where the caller's run resumes,
        after it sends what came before again); returns its id, if it has one."""
        raise NotImplementedError

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def event(self, name: str, data: dict, step: int) -> None:
        """A marker scalar ``events/<name>`` = 1 at ``step`` (charts show where it happened); backends
        that hold text add ``data`` as text."""
        self.log({f"events/{name}": 1.0}, step)

    def finish(self, failed: bool = False) -> None:
        raise NotImplementedError


def scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of ``metrics``, nested dicts flattened to ``a/b``; strings, booleans and None left out."""
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def flat_config(config: dict, prefix: str = "") -> dict[str, str]:
    """``config`` as ``a.b`` -> text (for trackers whose config is flat strings, like MLflow params)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_config(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return out


def as_text(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str)


def backend_class(name: str) -> type[Tracker]:
    return importlib.import_module(f"mutransfer.tracking.{name}_backend").Backend


def prepare(settings: TrackingSettings | None, root: str | Path) -> None:
    """Once, in the main process, before workers start runs: e.g. MLflow's database and experiment."""
    for name in (settings.backends if settings else ()):
        module = importlib.import_module(f"mutransfer.tracking.{name}_backend")
        if hasattr(module, "prepare"):
            try:
                module.prepare(settings, Path(root))
            except Exception as e:
                raise ConfigError(f"tracking.backends: {name} cannot open its store: {type(e).__name__}: "
                                  f"{str(e).strip()[:500]}{HINTS.get(name, '')}") from e


class Tracking:
    """The chosen backends as one sink. With no backend chosen every method does nothing."""

    def __init__(self, settings: TrackingSettings | None, root: str | Path):
        self.settings = settings or TrackingSettings()
        self.root = Path(root)
        self.backends: list[Tracker] = []
        self.last_step = 0

    @property
    def enabled(self) -> bool:
        return bool(self.settings.backends)

    def start(self, run_name: str, group: str, config: dict, resume: dict[str, str] | None = None,
              resume_step: int = 0) -> dict[str, str]:
        """Open the run in every backend; returns backend -> run id (kept to continue it on a resume)."""
        ids = {}
        self.last_step = resume_step
        for name in self.settings.backends:
            backend = backend_class(name)(self.settings, self.root)
            try:
                run_id = backend.start(run_name, group, config, (resume or {}).get(name), resume_step)
            except ConfigError:  # its package is missing: the message names the extra
                self.finish(failed=True)
                raise
            except Exception as e:  # a setting or a login to fix: one line, exit status 2, no traceback
                self.finish(failed=True)
                hint = HINTS.get(name, "")
                raise ConfigError(f"tracking.backends: {name} could not start run {run_name!r}: "
                                  f"{type(e).__name__}: {str(e).strip()[:500]}{hint}") from e
            self.backends.append(backend)
            if run_id is not None:
                ids[name] = run_id
        return ids

    def log(self, metrics: dict, step: int) -> None:
        if not self.backends:
            return
        values = scalars(metrics)
        if values:
            self._each("log", values, step)
        self.last_step = max(self.last_step, step)

    def event(self, name: str, data: dict | None = None, step: int | None = None) -> None:
        """An event (stage change, optimizer switch, checkpoint, a trial's outcome) at ``step``
        (default: the last step logged)."""
        if self.backends:
            self._each("event", name, data or {}, self.last_step if step is None else step)

    def finish(self, failed: bool = False) -> None:
        for backend in self.backends:
            try:
                backend.finish(failed)
            except Exception as e:  # noqa: BLE001 -- the run's files are written; a tracker's close is not fatal
                print(f"warning: tracking: {backend.name} failed to finish its run: {e}", file=sys.stderr)
        self.backends = []

    def _each(self, method: str, *args) -> None:
        step = args[-1]
        for backend in list(self.backends):
            if step <= backend.skip_through:
                continue
            try:
                getattr(backend, method)(*args)
            except Exception as e:  # noqa: BLE001 -- see the module docstring: drop the sink, keep training
                print(f"warning: tracking: {backend.name} failed ({type(e).__name__}: {e}); it gets no more "
                      "values in this run (the run's files have them all)", file=sys.stderr)
                self.backends.remove(backend)
                try:
                    backend.finish(failed=True)
                except Exception:  # noqa: BLE001, S110 -- already reported
                    pass

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(failed=exc_type is not None)
