"""Third-party log lines the terminal does not need: off unless `offside --verbose`.

Set before the libraries load, through the environment (inherited by the processes a stage or a sweep
starts) and the levels of loggers the libraries leave alone on import. Errors always show."""

from __future__ import annotations

import logging
import os
import warnings

# Children of the "ray" logger (Ray resets "ray" itself on import, not its children): token-auth notices,
# worker-count and resource warnings of Tune and Train.
RAY_LOGGERS = ("ray._private", "ray.tune", "ray.train", "ray.air", "ray.util", "ray.autoscaler", "ray.dashboard")
QUIET_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # "Creating initial MLflow database tables..." and other INFO lines
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
}


def configure(verbose: bool = False) -> None:
    """Quiet the libraries' INFO/WARNING chatter unless `verbose`; a variable the user set wins."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose:
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    # bitsandbytes and its `kernels` loader warn on every 4-bit load when the hub is offline.
    for name in (*RAY_LOGGERS, "torch.distributed", "py.warnings", "bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # DeepSpeed sets its logger's level when it is imported (and warns about the accelerator right then);
    # a filter on the logger outlives that.
    logging.getLogger("DeepSpeed").addFilter(_errors_only)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
