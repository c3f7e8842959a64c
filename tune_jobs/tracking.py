"""MLflow for sweeps: one parent run per sweep and one child run per trial, both get-or-create by tag
so a resumed sweep or a restarted trial never makes a second run; a Tune callback closes the child runs
of trials that ASHA stopped (KILLED) or that failed (FAILED), which would otherwise stay RUNNING.

In a trial, rank 0 logs each epoch's metrics with MLflow's asynchronous logging (`MetricLog`): a
tracking server that is down delays their delivery, not training. Every rank logs its own system
metrics (`SystemMetrics`), delivered the same way. Each start of a trial's workers is an attempt (`begin_attempt`): an epoch
that a resumed attempt runs again is logged under `attempt<n>/…`, so each plain key has one value
per epoch."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from offside.config import flatten
from offside.tracking import PARAM_VALUE_LIMIT, experiment_id, tracking_uri
from tune_jobs.state import write_atomically

SWEEP_TAG = "offside.sweep"
TRIAL_TAG = "ray_trial_id"
ATTEMPT_TAG = "offside.attempt"  # offside.attempts: how many; offside.attempt.<n>: where attempt n started
DELIVERY_WAIT_S = 60  # how long a finished attempt waits for its metrics to reach a tracking server that is down
UNDELIVERED = "undelivered-*.jsonl"  # what it could not deliver, in its worker directory, for the sweep's driver


def _find(client: MlflowClient, tags: dict[str, str]) -> str | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id(client)], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def parent_run(uri: str, sweep: str, params: dict) -> str:
    """The sweep's parent run (reopened as RUNNING when a sweep resumes)."""
    client = MlflowClient(uri)
    tags = {SWEEP_TAG: sweep, "stage": "sweep"}
    run_id = _find(client, tags)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        return run_id
    run_id = client.create_run(experiment_id(client), run_name=f"sweep-{sweep}", tags=tags).info.run_id
    log_params(client, run_id, params)
    return run_id


def child_run(uri: str, parent: str, sweep: str, trial_id: str, params: dict, tags: dict[str, str]) -> tuple[str, int]:
    """The trial's child run (reopened as RUNNING when the trial restarts): (run id, its start time in ms)."""
    client = MlflowClient(uri)
    run_id = _find(client, {SWEEP_TAG: sweep, TRIAL_TAG: trial_id})
    if run_id:
        client.update_run(run_id, status="RUNNING")
        return run_id, client.get_run(run_id).info.start_time
    all_tags = {"mlflow.parentRunId": parent, SWEEP_TAG: sweep, TRIAL_TAG: trial_id, **tags}
    info = client.create_run(experiment_id(client), run_name=f"{sweep}-{trial_id}", tags=all_tags).info
    log_params(client, info.run_id, params)
    return info.run_id, info.start_time


def trial_runs(uri: str, sweep: str) -> dict[str, object]:
    client = MlflowClient(uri)
    runs = client.search_runs([experiment_id(client)], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}'")
    return {r.data.tags[TRIAL_TAG]: r for r in runs if TRIAL_TAG in r.data.tags}


def log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    batch = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in flatten(params).items()]
    for i in range(0, len(batch), 90):
        client.log_batch(run_id, params=batch[i : i + 90])


class MetricLog:
    """A run's metrics and tags sent with MLflow's asynchronous logging: `log` returns at once. A batch
    whose delivery failed (MLflow's own retries gave up: a long outage) is sent again at the next `log`.
    `close` waits a while for delivery, then writes what is still undelivered to `spill` (JSON lines),
    which the sweep's driver delivers later (`deliver_spilled`): an outage of any length loses nothing."""

    def __init__(self, uri: str, run_id: str, spill: Path):
        self.client, self.run_id, self.spill = MlflowClient(uri), run_id, spill
        self._pending: list[tuple[list[Metric], list[RunTag], Future]] = []
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="offside-mlflow-delivery")

    def log(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None, tags: dict[str, str] | None = None) -> None:
        self._resend_failed()
        timestamp_ms = timestamp_ms or _now_ms()
        batch = [Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        self._send(batch, [RunTag(k, str(v)) for k, v in (tags or {}).items()])

    def _send(self, metrics: list[Metric], tags: list[RunTag]) -> None:
        operations = self.client.log_batch(self.run_id, metrics=metrics, tags=tags, synchronous=False)
        self._pending.append((metrics, tags, self._waiter.submit(operations.wait) if operations else _done()))

    def _resend_failed(self) -> None:
        failed = [(m, t) for m, t, f in self._pending if f.done() and f.exception() is not None]
        self._pending = [entry for entry in self._pending if not entry[2].done()]
        for metrics, tags in failed:
            self._send(metrics, tags)

    def close(self, timeout_s: float = DELIVERY_WAIT_S) -> int:
        """Waits until every batch is delivered (resending failed ones) or `timeout_s` passed; writes the
        rest to the spill file. Returns how many metric values were left to the spill file."""
        deadline = time.monotonic() + timeout_s
        self._resend_failed()
        while self._pending and time.monotonic() < deadline:
            wait([f for _, _, f in self._pending], timeout=max(0.0, deadline - time.monotonic()), return_when=FIRST_COMPLETED)
            self._resend_failed()
        left = [(m, t) for m, t, _ in self._pending]
        self._waiter.shutdown(wait=False, cancel_futures=True)
        if left:
            lines = [json.dumps({"run_id": self.run_id, "metrics": [[x.key, x.value, x.timestamp, x.step] for x in m],
                                 "tags": {x.key: x.value for x in t}}) for m, t in left]
            with open(self.spill, "a") as f:
                f.write("".join(line + "\n" for line in lines))
            print(f"offside: warning: the tracking server did not take {sum(len(m) for m, _ in left)} metric values of run "
                  f"{self.run_id} within {timeout_s:.0f} s; they are in {self.spill}, for the sweep to deliver", file=sys.stderr, flush=True)
        return sum(len(m) for m, _ in left)


def deliver_spilled(uri: str, sweep_dir: Path) -> int:
    """Logs what trials could not deliver (`MetricLog.close`) and removes the files; returns how many
    metric values it delivered."""
    client, count = MlflowClient(uri), 0
    for path in sorted(sweep_dir.glob(f"workers/*/{UNDELIVERED}")):
        for line in path.read_text().splitlines():
            try:
                batch = json.loads(line)
            except ValueError:  # its last line, cut short by a full disk
                print(f"offside: warning: {path}: an unreadable line skipped", file=sys.stderr, flush=True)
                continue
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in batch["metrics"]]
            client.log_batch(batch["run_id"], metrics=metrics, tags=[RunTag(k, v) for k, v in batch["tags"].items()])
            count += len(metrics)
        path.unlink()
    return count


def _done() -> Future:
    future: Future = Future()
    future.set_result(None)
    return future


@dataclass
class Attempt:
    """One start of a trial's workers: its number (1, 2, …), the epoch its checkpoint held, and the
    last epoch that earlier attempts logged (re-run epochs up to it are logged under attempt<n>/…)."""

    number: int
    from_epoch: int
    logged_epoch: int
    record: Path

    def keys(self, epoch: int, metrics: dict[str, float]) -> dict[str, float]:
        """What to log for `epoch`: the plain keys (and `attempt`) the first time an epoch is logged;
        `attempt<n>/<key>` when this attempt runs an epoch again."""
        if epoch > self.logged_epoch:
            return {**metrics, "attempt": self.number}
        return {f"attempt{self.number}/{k}": v for k, v in metrics.items()}

    def logged(self, epoch: int) -> None:
        if epoch > self.logged_epoch:
            self.logged_epoch = epoch
            doc = json.loads(self.record.read_text())
            write_atomically(self.record, json.dumps({**doc, "logged_epoch": epoch}))

    def tags(self) -> dict[str, str]:
        return {f"{ATTEMPT_TAG}s": str(self.number),
                f"{ATTEMPT_TAG}.{self.number}": f"from epoch {self.from_epoch}, started {time.strftime('%Y-%m-%d %H:%M:%S')} "
                                                f"on {os.uname().nodename} (pid {os.getpid()})"}


def begin_attempt(directory: Path, from_epoch: int) -> Attempt:
    """Counts a new attempt of the trial whose worker records are in `directory` (rank 0 calls it)."""
    record = directory / "attempts.json"
    doc = json.loads(record.read_text()) if record.exists() else {"attempts": 0, "logged_epoch": 0}
    doc["attempts"] += 1
    write_atomically(record, json.dumps(doc))
    return Attempt(doc["attempts"], from_epoch, doc["logged_epoch"], record)


class SystemMetrics:
    """One training rank's CPU, memory, disk, network and (where present) its own GPU's utilisation
    and memory, sampled by MLflow's system-metrics monitors every `interval_s` in a thread and logged as
    `system/rank<r>/…` in the trial's run through a `MetricLog`: a tracking server that is down delays
    their delivery, as it does the epochs' metrics, and loses none. (MLflow's own SystemMetricsMonitor
    asks the server for the run's status before every sample and waits out minutes of retries when it
    is down, sampling nothing; MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING acts only on runs started with
    mlflow.start_run.) A sample's step is the number of intervals since the run started, so the ranks'
    samples line up and a resumed trial's follow its earlier ones."""

    def __init__(self, uri: str, run_id: str, rank: int, interval_s: float, run_start_ms: int, spill: Path):
        self.prefix, self.interval_s, self.run_start_ms = f"system/rank{rank}/", interval_s, run_start_ms
        self.monitors = _system_monitors()
        self.log = MetricLog(uri, run_id, spill)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name=f"offside-system-metrics-rank{rank}")
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            metrics = {}
            for monitor in self.monitors:
                monitor.collect_metrics()
                metrics.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
            now = _now_ms()
            step = int((now - self.run_start_ms) / (self.interval_s * 1000))
            self.log.log({self.prefix + k: v for k, v in metrics.items()}, step, now)

    def finish(self, timeout_s: float = 10) -> None:
        """Stops sampling and delivers what is pending, leaving to the spill file what the tracking
        server does not take within `timeout_s`."""
        self._stop.set()
        self._thread.join()
        self.log.close(timeout_s)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _system_monitors() -> list:
    """MLflow's CPU/memory, disk and network monitors, and its NVIDIA (else AMD) GPU monitor where
    one starts, keeping only this rank's own GPU."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
    from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    for gpu_monitor in (GPUMonitor, ROCMMonitor):
        try:
            monitors.append(gpu_monitor())
            break
        except Exception:  # no such GPU, or no NVML/ROCm library
            continue
    _own_gpu_only(monitors)
    return monitors


def _own_gpu_only(monitors: list) -> None:
    """NVML lists every GPU of the node; keep the one this rank trains on (matched by UUID), so each
    rank's `system/rank<r>/gpu_0_*` is its own GPU."""
    import torch

    from offside.models.loading import resolve_device

    gpus = [m for m in monitors if hasattr(m, "gpu_handles")]
    if not gpus or not torch.cuda.is_available():
        return
    import pynvml

    uuid = str(torch.cuda.get_device_properties(resolve_device("auto")).uuid)  # NVML's says "GPU-<uuid>"
    for gpu in gpus:
        own = [h for h in gpu.gpu_handles if _text(pynvml.nvmlDeviceGetUUID(h)).endswith(uuid)]
        if own:
            gpu.gpu_handles, gpu.num_gpus = own, 1


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def close_trial(uri: str, sweep: str, trial_id: str, status: str) -> None:
    """Sets the trial's child run's status; a tracking server that cannot be reached is warned about,
    not raised (the sweep's end sets every child's status again)."""
    try:
        client = MlflowClient(uri)
        run_id = _find(client, {SWEEP_TAG: sweep, TRIAL_TAG: trial_id})
        if run_id:
            client.set_terminated(run_id, status)
    except Exception as err:  # the tracking server is down: training goes on
        print(f"offside: warning: could not mark trial {trial_id}'s run {status} ({type(err).__name__}: "
              f"{str(err).splitlines()[0] if str(err) else ''})", file=sys.stderr, flush=True)


def mark_parent(uri: str, run_id: str, status: str, wait_s: float = 20) -> None:
    """Sets the sweep's run status on the way out of a failure or an interrupt, waiting at most `wait_s`
    (MLflow's retries would hold a Ctrl+C up for minutes when the tracking server is down)."""
    worker = threading.Thread(target=MlflowClient(uri).set_terminated, args=(run_id, status), daemon=True)
    worker.start()
    worker.join(wait_s)
    if worker.is_alive():
        print(f"offside: warning: could not mark the sweep's run {run_id} {status}: the tracking server does not answer",
              file=sys.stderr, flush=True)


def settle_trial_runs(uri: str, sweep: str, statuses: dict[str, str]) -> None:
    """At the sweep's end: each trial's child run gets its final status where it has another (a callback
    could not reach the tracking server, or the sweep was interrupted with trials running)."""
    try:
        client = MlflowClient(uri)
        for trial_id, run in trial_runs(uri, sweep).items():
            if trial_id in statuses and run.info.status != statuses[trial_id]:
                client.set_terminated(run.info.run_id, statuses[trial_id])
    except Exception as err:  # the tracking server is down
        print(f"offside: warning: could not set the trials' run statuses ({type(err).__name__})", file=sys.stderr, flush=True)


def trial_run_status(trial, planned_epochs) -> str:
    """A trial's child run status from its Tune state: FINISHED when it ran all its epochs, KILLED when
    the scheduler stopped it or the sweep was interrupted, FAILED when it errored."""
    if trial.status == "ERROR":
        return "FAILED"
    return "FINISHED" if trial.status == "TERMINATED" and _ran_all(trial, planned_epochs) else "KILLED"


def _ran_all(trial, planned_epochs) -> bool:
    return (trial.last_result or {}).get("epoch", 0) >= planned_epochs(trial.config)


def closing_callback(sweep: str, planned_epochs):
    """A ray.tune Callback (built here so ray is imported only when a sweep runs) that closes child
    runs as trials end: FINISHED when the trial ran all its epochs, KILLED when the scheduler stopped
    it, FAILED when it errored after its retries. The tracking URI is looked up when a trial ends
    (MLFLOW_TRACKING_URI, else `mlflow.db` beside the sweep, wherever the sweep is now)."""
    from ray.tune import Callback

    def uri(trial) -> str:
        return tracking_uri(Path(trial.storage.experiment_fs_path).parent)

    def close(trial, status: str) -> None:  # in a thread: a tracking server that is down must not hold up Tune's loop
        threading.Thread(target=close_trial, args=(uri(trial), sweep, trial.trial_id, status), daemon=True).start()

    class CloseTrialRuns(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            close(trial, "FINISHED" if _ran_all(trial, planned_epochs) else "KILLED")

        def on_trial_error(self, iteration, trials, trial, **info):
            close(trial, "FAILED")

    return CloseTrialRuns()
