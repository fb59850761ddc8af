"""Early exits (EdgeKE): multi-exit training strategies, threshold calibration, voting, measured
operating points and the on-demand policy that maps a request to one of them.

Modules: ``inference`` (segmented early-exit inference), ``confidence``, ``voting``,
``calibrate`` (thresholds from exit proportions, operating points measured on this device),
``policy`` (request -> operating point), ``ondemand`` (the ``predict`` API over a checkpoint),
``train`` (sync / async / async_back, optionally distilled), ``demo`` (the demo step).
"""

from edgeweave.exits.calibrate import OperatingPoint, calibrate, thresholds_from_proportions
from edgeweave.exits.inference import ExitResult, early_exit, forced_exit_thresholds, simulate
from edgeweave.exits.ondemand import OnDemandModel, Prediction, predict
from edgeweave.exits.policy import Choice, choose
from edgeweave.exits.train import STRATEGIES, train_multi_exit

__all__ = [
    "STRATEGIES",
    "Choice",
    "ExitResult",
    "OnDemandModel",
    "OperatingPoint",
    "Prediction",
    "calibrate",
    "choose",
    "early_exit",
    "forced_exit_thresholds",
    "predict",
    "simulate",
    "thresholds_from_proportions",
    "train_multi_exit",
]
