"""``[tracking]``: which experiment trackers a command feeds besides its own files, checked before compute.

The run directory's files (metrics.jsonl, trials.parquet, runs.jsonl, coord.parquet) stay the
source of truth; a tracker is an extra sink, chosen by the user and off by default. Each backend
is an optional extra of the package; choosing one that is not installed is a ``ConfigError``
that names the extra, raised before any compute.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Literal

from pydantic import Field, model_validator

from mutransfer.config import Config, ConfigError

BACKENDS = ("tensorboard", "wandb", "mlflow", "trackio")
Backend = Literal["tensorboard", "wandb", "mlflow", "trackio"]
# backend -> the module it needs (the package extra has the backend's name)
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


class TrackingSettings(Config):
    """``[tracking]``: experiment trackers fed besides the run's own files (``--track`` overrides
    ``backends``). Every command that produces curves sends them: train, sweep (a tracker run per
    trial), transfer-check and coord-check (a tracker run per grid point).
    """

    backends: list[Backend] = Field(default_factory=list)
    """e.g. ['tensorboard', 'wandb']; empty: files only"""
    project: str = "mutransfer"
    """W&B project, MLflow experiment, trackio project"""
    mlflow_uri: str | None = None
    """MLflow tracking URI; default: sqlite database mlflow.db in the run directory"""
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    """default: $WANDB_MODE, else online"""
    wandb_entity: str | None = None
    """W&B team or user; default: the logged-in account's"""

    @model_validator(mode="after")
    def _unique(self) -> TrackingSettings:
        if len(set(self.backends)) != len(self.backends):
            raise ValueError(f"backends = {self.backends} names a backend twice")
        if not self.project.strip():
            raise ValueError("project must not be empty")
        return self


def install_hint(backend: str) -> str:
    return f'pip install "mutransfer[{backend}]" (in a checkout: pip install -e ".[{backend}]")'


def installed(backend: str) -> bool:
    """Whether the backend's package can be imported (cheap: nothing is imported)."""
    module = MODULES[backend]
    if module in sys.modules:
        return sys.modules[module] is not None  # None: import blocked
    return importlib.util.find_spec(module) is not None


def check_installed(settings: TrackingSettings, where: str = "tracking.backends") -> None:
    """Before compute: every chosen backend is installed, else a ConfigError naming the extra."""
    for backend in settings.backends:
        if not installed(backend):
            raise ConfigError(f"{where}: {backend!r} is chosen but the {MODULES[backend]} package is not "
                              f"installed; install it with {install_hint(backend)}")


def require(backend: str):
    """The backend's module, imported now; a ConfigError naming the extra when it is missing."""
    try:
        return importlib.import_module(MODULES[backend])
    except ImportError as e:
        raise ConfigError(f"tracking.backends: {backend!r} needs the {MODULES[backend]} package "
                          f"({e}); install it with {install_hint(backend)}") from e


def track_override(text: str) -> str:
    """``--track tensorboard,wandb`` (or ``none``) as the ``--set`` assignment of ``tracking.backends``."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        names = []
    elif not names:
        raise ConfigError(f"--track {text!r}: name at least one backend; allowed: {list(BACKENDS)} or 'none'")
    for name in names:
        if name not in BACKENDS:
            raise ConfigError(f"--track {text}: unknown backend {name!r}; allowed: {list(BACKENDS)} or 'none'")
    return "tracking.backends=[" + ", ".join(f'"{n}"' for n in names) + "]"


TRACK_HELP = ("experiment trackers to feed besides the files, comma-separated: " + ", ".join(BACKENDS)
              + " (or none); overrides tracking.backends")
