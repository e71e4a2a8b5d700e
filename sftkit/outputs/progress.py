"""Progress on the TrainJob: rank 0 reports the step, the percentage done, the estimated remaining seconds, the
training loss and the held-out loss to Kubeflow Trainer, which writes them into the TrainJob's
``status.trainerStatus`` (``kubectl get trainjob NAME -o jsonpath='{.status.trainerStatus}'``).

Kubeflow Trainer (v2.2 or later, its alpha feature gate ``TrainJobStatus`` on) gives every trainer container
three variables: ``KUBEFLOW_TRAINER_SERVER_URL``, the controller's status endpoint for this TrainJob
(``https://...:10443/apis/trainer.kubeflow.org/v1alpha1/namespaces/NS/trainjobs/NAME/status``);
``KUBEFLOW_TRAINER_SERVER_CA_CERT``, the CA that signed the endpoint's certificate; ``KUBEFLOW_TRAINER_SERVER_TOKEN``,
a projected service-account token with the TrainJob as its audience, rotated by the kubelet. A report is a POST of
``{"trainerStatus": {...}}`` with that token as a bearer token. The controller applies each report as the whole
``trainerStatus`` (a field left out is removed), so every report carries everything known. Without the variables
this module does nothing. transformers reports there too, with a callback it turns on by itself inside a TrainJob;
this one takes its place (``trainjob_progress``).

Reports leave from a thread of their own, at most one every ``MIN_INTERVAL_SECONDS`` (as the Kubeflow SDK and
transformers' callback send them; the controller's API client is rate-limited): a report waiting for its turn is
replaced by a newer one, so the latest always goes. A slow or absent endpoint never delays a step; a failed report
is said once, as a warning, and training goes on. The last report of a run (100%, nothing remaining, for a run that
reached max_steps) is waited for, at most ``TIMEOUT_SECONDS``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from trl import SFTConfig

from sftkit.recipe import Recipe

logger = logging.getLogger(__name__)

URL_VARIABLE = "KUBEFLOW_TRAINER_SERVER_URL"
CA_CERT_VARIABLE = "KUBEFLOW_TRAINER_SERVER_CA_CERT"
TOKEN_VARIABLE = "KUBEFLOW_TRAINER_SERVER_TOKEN"
MIN_INTERVAL_SECONDS = 5.0
TIMEOUT_SECONDS = 5.0
INT32_MAX = 2**31 - 1  # progressPercentage and estimatedRemainingSeconds are int32 in the TrainJob's schema
TRAINJOB_PATH = re.compile(r"/namespaces/(?P<namespace>[^/]+)/trainjobs/(?P<name>[^/]+)/status$")


@dataclass(frozen=True)
class Endpoint:
    """Where reports go and how they prove they come from the TrainJob's pods, as the controller injected it."""

    url: str
    ca_cert: str | None
    token: str | None  # the token's file

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Endpoint | None:
        """The endpoint of the TrainJob this process runs in; None outside one, or where the gate is off."""
        url = environ.get(URL_VARIABLE)
        return cls(url, environ.get(CA_CERT_VARIABLE), environ.get(TOKEN_VARIABLE)) if url else None

    def kubectl(self) -> str:
        """The command that shows what was reported."""
        match = TRAINJOB_PATH.search(self.url)
        name, namespace = (match["name"], f" -n {match['namespace']}") if match else ("NAME", "")
        return f"kubectl get trainjob {name}{namespace} -o jsonpath='{{.status.trainerStatus}}'"

    def post(self, report: dict[str, Any], timeout: float) -> None:
        """POST one report; raises what went wrong. The token and the CA are read anew each time: the kubelet
        rotates the token, the controller its certificate."""
        if not self.token:
            raise OSError(f"{TOKEN_VARIABLE} names no token file")
        token = Path(self.token).read_text().strip()
        context = ssl.create_default_context(cafile=self.ca_cert)
        request = urllib.request.Request(self.url, data=json.dumps(report).encode(), method="POST", headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        # A direct connection: the endpoint is a service inside the cluster, where a proxy for the outside would not go.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=context))
        with opener.open(request, timeout=timeout) as response:
            response.read()


def trainer_status(step: int, max_steps: int, remaining: float | None, loss: float | None,
                   eval_loss: float | None, observed: datetime) -> dict[str, Any]:
    """A report as the controller reads it (``UpdateTrainJobStatusRequest``): whole percent and seconds (int32), each
    metric's value a string, ``lastUpdatedTime`` in RFC 3339."""
    status: dict[str, Any] = {}
    metrics = [("current_step", str(step))]  # the names transformers' own Kubeflow callback uses
    if max_steps > 0:
        status["progressPercentage"] = max(0, min(100, 100 * step // max_steps))
        metrics.append(("total_steps", str(max_steps)))
    if remaining is not None:
        status["estimatedRemainingSeconds"] = max(0, min(INT32_MAX, round(remaining)))
    metrics += [(name, f"{value:.6g}") for name, value in (("loss", loss), ("eval_loss", eval_loss))
                if value is not None]
    status["metrics"] = [{"name": name, "value": value} for name, value in metrics]
    status["lastUpdatedTime"] = observed.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"trainerStatus": status}


class Sender:
    """Posts the latest report from a thread of its own, at most one every ``interval`` seconds; the thread ends when
    nothing waits and starts again with the next report."""

    def __init__(self, endpoint: Endpoint, interval: float, timeout: float) -> None:
        self.endpoint, self.interval, self.timeout = endpoint, interval, timeout
        self.condition = threading.Condition()
        self.waiting: dict[str, Any] | None = None  # the report to send next
        self.urgent = False  # send it without waiting for its turn
        self.next_time = 0.0  # time.monotonic() from which the next report may leave
        self.thread: threading.Thread | None = None
        self.sent = self.failed = 0

    def offer(self, report: dict[str, Any], urgent: bool = False) -> None:
        with self.condition:
            self.waiting = report
            self.urgent = self.urgent or urgent
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="sftkit-trainjob-progress", daemon=True)
                self.thread.start()
            self.condition.notify()

    def flush(self, timeout: float) -> None:
        """Sends what waits now and waits for it, at most ``timeout`` seconds: the run's last reports."""
        with self.condition:
            self.urgent = True
            self.condition.notify()
            thread = self.thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self.condition:
                while (self.waiting is not None and not self.urgent
                       and (delay := self.next_time - time.monotonic()) > 0):
                    self.condition.wait(delay)
                if self.waiting is None:
                    self.thread, self.urgent = None, False
                    return
                report, self.waiting = self.waiting, None
            self._send(report)
            self.next_time = time.monotonic() + self.interval

    def _send(self, report: dict[str, Any]) -> None:
        try:
            self.endpoint.post(report, self.timeout)
            self.sent += 1
        except Exception as error:  # noqa: BLE001 - whatever goes wrong, training goes on
            self.failed += 1
            if self.failed == 1:
                logger.warning("progress: the TrainJob's status endpoint %s did not take a report: %s. Training goes "
                               "on without it; later failed reports are not logged", self.endpoint.url, reason(error))
            else:
                logger.debug("progress: report failed: %s", reason(error))


def reason(error: Exception) -> str:
    """What went wrong with a report, as the controller or the network said it."""
    if isinstance(error, urllib.error.HTTPError):
        try:  # the controller answers a refusal with a Kubernetes Status object
            message = json.loads(error.read() or b"{}").get("message")
        except (ValueError, AttributeError, OSError):
            message = None
        return f"HTTP {error.code} {message or error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return str(error) or type(error).__name__


class TrainJobProgress(TrainerCallback):
    """Reports the run's progress to its TrainJob from rank 0: at the start, at every logged loss and held-out loss,
    and at the end. The remaining time is the steps left at the pace of the steps this process trained (a resumed
    run counts from where it resumed; evaluations and saves so far are part of the pace)."""

    def __init__(self, endpoint: Endpoint, interval: float = MIN_INTERVAL_SECONDS, timeout: float = TIMEOUT_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoint, self.interval, self.timeout, self.clock = endpoint, interval, timeout, clock
        self.sender: Sender | None = None  # rank 0's, from the start of training
        self.first: tuple[int, float] | None = None  # the first step this process trained, and when it ended
        self.loss: float | None = None
        self.eval_loss: float | None = None
        self.trained = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.sender = Sender(self.endpoint, self.interval, self.timeout)
            logger.info("progress: reported to the TrainJob (step, progress, remaining time, loss, held-out loss); "
                        "see it with: %s", self.endpoint.kubectl())
            self._report(state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.first is None:
            self.first = (state.global_step, self.clock())

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" not in logs and "eval_loss" not in logs:
            return
        self.loss = logs.get("loss", self.loss)
        self.eval_loss = logs.get("eval_loss", self.eval_loss)
        self._report(state, last=self.trained)  # after training: the final held-out loss

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trained = True
        self._report(state, last=True)

    def _report(self, state: Any, last: bool = False) -> None:
        if self.sender is None:
            return
        step, max_steps = state.global_step, state.max_steps
        self.sender.offer(trainer_status(step, max_steps, self._remaining(step, max_steps), self.loss,
                                         self.eval_loss, datetime.now(timezone.utc)), urgent=last)
        if last:
            self.sender.flush(self.timeout)

    def _remaining(self, step: int, max_steps: int) -> float | None:
        """Seconds left at the pace so far; None before a pace is known, and for a run stopped before its end (a
        restart resumes it)."""
        if max_steps > 0 and step >= max_steps:
            return 0.0
        if self.trained or self.first is None or max_steps <= 0 or step <= self.first[0]:
            return None
        first_step, first_time = self.first
        pace = (self.clock() - first_time) / (step - first_step)
        return pace * (max_steps - step) if math.isfinite(pace) else None


def trainjob_progress(recipe: Recipe, args: SFTConfig,
                      environ: Mapping[str, str] = os.environ) -> list[TrainerCallback]:
    """The callback that reports progress to the TrainJob this run is part of, to add to the trainer made with
    ``args``; none outside one.

    Inside one, transformers turns on a Kubeflow callback of its own (it adds ``kubeflow`` to ``report_to``), whose
    reports would overwrite these: this callback takes its place, so ``kubeflow`` leaves ``args.report_to``. A recipe
    whose ``report_to`` names ``kubeflow`` keeps transformers' callback instead."""
    endpoint = Endpoint.from_environment(environ)
    if endpoint is None:
        return []
    asked = recipe.values.get("report_to")
    if "kubeflow" in ([asked] if isinstance(asked, str) else list(asked or [])):
        logger.info("progress: report_to names kubeflow, so transformers' callback reports to the TrainJob")
        return []
    args.report_to = [name for name in args.report_to if name != "kubeflow"]
    return [TrainJobProgress(endpoint, MIN_INTERVAL_SECONDS, TIMEOUT_SECONDS)]
