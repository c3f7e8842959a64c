"""A sweep's verdict: finished, interrupted (Ctrl+C; exit 130) or failed (exit 1), and for a failure
which trials errored, with their first error line, and whether `--resume` can help."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*m")
ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt)\b(?:\([^)]*\))?:? .*")
# Errors of the machines, not of a trial's settings or code: a retry can succeed once the cause is gone.
TRANSIENT = ("OSError", "IOError", "PermissionError", "TimeoutError", "ConnectionError", "ActorDiedError",
             "ActorUnavailableError", "NodeDiedError", "WorkerCrashedError", "RayActorError", "ObjectLostError",
             "OwnerDiedError", "OutOfMemoryError", "GetTimeoutError", "RaySystemError", "WorkerGroupStartupTimeoutError",
             "WorkerHealthCheckFailedError", "MlflowException", "RestException")


@dataclass
class TrialFailure:
    trial_id: str
    error: str  # the root error's first line
    transient: bool  # a machine's error (disk, node, network): `--resume` retries it once the cause is gone

    def line(self) -> str:
        return f"  trial {self.trial_id}: {self.error}"


def trial_failure(trial) -> TrialFailure:
    text = Path(trial.error_file).read_text(errors="replace") if trial.error_file and Path(trial.error_file).exists() else ""
    text = text or str(trial.get_error() or "")
    line = error_line(text) or "failed (no error recorded)"
    return TrialFailure(trial.trial_id, line, is_transient(line))


def error_line(text: str) -> str | None:
    """The last exception line of a Ray traceback (Ray prints the root cause last)."""
    found = [line.strip() for line in ANSI.sub("", text).splitlines() if ERROR_LINE.match(line.strip())]
    return found[-1] if found else None


def is_transient(line: str) -> bool:
    name = line.split(":", 1)[0].split("(", 1)[0].rsplit(".", 1)[-1]
    return name in TRANSIENT or "No space left on device" in line


def advice(failures: list[TrialFailure], sweep_dir: Path) -> str:
    """What to do next, in a line or two."""
    resume = f"offside tune --resume {sweep_dir}"
    if any("No space left on device" in f.error for f in failures):
        return (f"the storage is full: free space there (or copy {sweep_dir.parent}, with its mlflow.db, to a larger disk and resume "
                f"the copy), then {resume} retries the failed trials from their last checkpoints")
    if all(f.transient for f in failures):
        return f"{resume} retries the failed trials from their last checkpoints once the cause above is gone"
    return (f"{resume} retries the failed trials from their last checkpoints, but the errors above come from their "
            "settings or code and will recur until that is fixed")
