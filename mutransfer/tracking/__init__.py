"""Experiment tracking: every command's curves also go to TensorBoard, W&B, MLflow or trackio.

``settings`` holds the ``[tracking]`` table and the ``--track`` flag; ``tracker`` the one sink
(``Tracking``) the commands write to; one module per backend, imported only when chosen.
"""

from mutransfer.tracking.settings import BACKENDS, TRACK_HELP, TrackingSettings, check_installed, track_override
from mutransfer.tracking.tracker import Tracking, prepare

__all__ = ["BACKENDS", "TRACK_HELP", "Tracking", "TrackingSettings", "check_installed", "prepare", "track_override"]
