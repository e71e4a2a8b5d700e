"""Progress on the TrainJob: what rank 0 sends is what Kubeflow Trainer's status endpoint takes, and sending it
never costs training anything.

The stand-in plays the controller's status server (Kubeflow Trainer v2.3.0, ``pkg/statusserver``): HTTPS with a
certificate signed by the CA the pods are given, ``POST /apis/trainer.kubeflow.org/v1alpha1/namespaces/NS/trainjobs/
NAME/status``, the projected token as a bearer token (the current one only: the kubelet rotates it), a body of at
most 64 KiB, answered 200, 403, 404, 413 or 422 with a Kubernetes Status. It checks each body against the CRD's
schema for ``status.trainerStatus`` (``tests/data/trainjob_trainer_status.yaml``), its CEL rule, int32 integers
and an RFC 3339 time, and refuses any field the schema does not define: the controller would drop such a field
without a word, so a report that holds one says something nobody sees.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
import yaml
from helpers import ROOT
from transformers import TrainerControl, TrainerState

from sftkit.outputs import progress
from sftkit.outputs.progress import Endpoint, TrainJobProgress, trainer_status, trainjob_progress

SCHEMA = Path(__file__).parent / "data" / "trainjob_trainer_status.yaml"
QUICKSTART = ROOT / "configs" / "recipes" / "quickstart.yaml"
STATUS_PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml-team/trainjobs/qwen-sft/status"
MAX_BODY = 1 << 16  # the status server's limit
INT32_MAX = 2**31 - 1
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")  # what Go's time.RFC3339 parses


def strict(schema: Any) -> Any:
    """No field beyond those the schema defines."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict(value) for key, value in schema.items()}
    if "properties" in schema:
        schema["additionalProperties"] = False
    return schema


TRAINER_STATUS = jsonschema.Draft7Validator(strict(yaml.safe_load(SCHEMA.read_text())),
                                            format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


def problems(body: Any) -> list[str]:
    """Why the controller would refuse or lose this body (``UpdateTrainJobStatusRequest``); empty if it takes it."""
    if not isinstance(body, dict) or set(body) - {"trainerStatus"}:
        return [f"the body is not {{trainerStatus: ...}}: {body!r}"]
    status = body.get("trainerStatus")
    if status is None:
        return []
    found = [f"trainerStatus.{'.'.join(map(str, error.absolute_path))}: {error.message}"
             for error in TRAINER_STATUS.iter_errors(status)]
    if isinstance(status, dict):
        if "lastUpdatedTime" not in status:
            found.append("lastUpdatedTime is required when trainerStatus is present")
        elif not (isinstance(status["lastUpdatedTime"], str) and RFC3339.fullmatch(status["lastUpdatedTime"])):
            found.append(f"lastUpdatedTime {status['lastUpdatedTime']!r} is not RFC 3339")
        for name in ("progressPercentage", "estimatedRemainingSeconds"):
            value = status.get(name)  # Go decodes them into *int32: 45.0 or 2**31 is refused
            if name in status and (type(value) is not int or not 0 <= value <= INT32_MAX):
                found.append(f"{name} {value!r} is not an int32")
    return found


class StandIn:
    """Kubeflow Trainer's status endpoint for one TrainJob, on 127.0.0.1."""

    def __init__(self, folder: Path, certificates: dict[str, Path]) -> None:
        self.token_file = folder / "token"
        self.token_file.write_text("token-1\n")
        self.reports: list[dict] = []
        self.refused: list[tuple[int, str]] = []
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.path != STATUS_PATH:
                    return self.answer(404, "Not found")
                if self.headers.get("Authorization") != f"Bearer {stand_in.token_file.read_text().strip()}":
                    return self.answer(403, "Forbidden")
                if length > MAX_BODY:
                    return self.answer(413, "Payload too large")
                try:
                    report = json.loads(body)
                except ValueError:
                    return self.answer(422, "Invalid payload")
                if found := problems(report) or self.headers.get("Content-Type") != "application/json" and [
                        f"Content-Type {self.headers.get('Content-Type')}"]:
                    return self.answer(422, "; ".join(found))
                with stand_in.lock:
                    stand_in.reports.append(report)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps(report).encode())

            def answer(self, code: int, message: str) -> None:
                with stand_in.lock:
                    stand_in.refused.append((code, message))
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                             "message": message, "code": code}).encode())

            def log_message(self, *args: Any) -> None:
                pass

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certificates["server.crt"], certificates["server.key"])
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.ca = certificates["ca.crt"]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def environment(self) -> dict[str, str]:
        """The variables the controller gives every trainer container."""
        return {"KUBEFLOW_TRAINER_SERVER_URL": f"https://127.0.0.1:{self.server.server_port}{STATUS_PATH}",
                "KUBEFLOW_TRAINER_SERVER_CA_CERT": str(self.ca),
                "KUBEFLOW_TRAINER_SERVER_TOKEN": str(self.token_file)}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, Path]:
    """A CA, and the endpoint's certificate for 127.0.0.1 signed by it (the controller's webhook certificate)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes the stand-in's certificates")
    folder = tmp_path_factory.mktemp("tls")
    (folder / "ca.cnf").write_text(
        "[req]\ndistinguished_name = dn\nx509_extensions = ca\nprompt = no\n[dn]\nCN = stand-in CA\n"
        "[ca]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n"
        "subjectKeyIdentifier = hash\n")
    (folder / "server.ext").write_text(
        "basicConstraints = CA:FALSE\nsubjectAltName = IP:127.0.0.1\nkeyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = serverAuth\nauthorityKeyIdentifier = keyid\n")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for command in (
        ["req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-config", "ca.cnf"],
        ["req", *key, "-keyout", "server.key", "-out", "server.csr",
         "-subj", "/CN=kubeflow-trainer-controller-manager"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "server.crt", "-days", "2", "-extfile", "server.ext"],
    ):
        subprocess.run(["openssl", *command], cwd=folder, check=True, capture_output=True)
    return {name: folder / name for name in ("ca.crt", "server.crt", "server.key")}


@pytest.fixture
def stand_in(tmp_path, certificates):
    server = StandIn(tmp_path, certificates)
    yield server
    server.close()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def state(step: int = 0, max_steps: int = 10, rank_zero: bool = True) -> TrainerState:
    return TrainerState(global_step=step, max_steps=max_steps, is_world_process_zero=rank_zero)


def post(endpoint: Endpoint, body: Any) -> int:
    """The status code the endpoint answers ``body`` with."""
    try:
        endpoint.post(body, timeout=5)
    except urllib.error.HTTPError as error:
        return error.code
    return 200


# ---------------------------------------------------------------- the reports


def test_reports_fit_the_trainjob_schema_count_down_in_seconds_and_follow_the_rotated_token(stand_in):
    """A 10-step run at 2 s a step, a loss logged every 2 steps, held-out losses at steps 0 and 10: the percentage
    climbs to 100, the remaining seconds are the steps left at 2 s (known once two steps ended), and both losses
    arrive; the token rotated mid-run is read anew."""
    now = [100.0]
    callback = TrainJobProgress(Endpoint.from_environment(stand_in.environment()), interval=0, clock=lambda: now[0])
    run, control = state(), TrainerControl()

    def settle() -> None:
        callback.sender.flush(5)

    callback.on_train_begin(None, run, control)
    settle()
    callback.on_log(None, run, control, logs={"eval_loss": 6.5179})
    settle()
    for step in range(1, 11):
        now[0] += 2.0
        run.global_step = step
        callback.on_step_end(None, run, control)
        if step == 6:
            stand_in.token_file.write_text("token-2\n")
        if step % 2 == 0:
            logs = {"loss": 6.0 - step * 0.5, "grad_norm": 1.0, "learning_rate": 3e-3}
            callback.on_log(None, run, control, logs=logs)
            settle()
    callback.on_log(None, run, control, logs={"eval_loss": 0.4808})
    settle()
    callback.on_train_end(None, run, control)

    assert stand_in.refused == []
    statuses = [report["trainerStatus"] for report in stand_in.reports]
    assert [status["progressPercentage"] for status in statuses] == [0, 0, 20, 40, 60, 80, 100, 100, 100]
    assert [status.get("estimatedRemainingSeconds") for status in statuses] == [None, None, 16, 12, 8, 4, 0, 0, 0]
    metrics = [{metric["name"]: metric["value"] for metric in status["metrics"]} for status in statuses]
    assert metrics[0] == {"current_step": "0", "total_steps": "10"}
    assert metrics[1] == {"current_step": "0", "total_steps": "10", "eval_loss": "6.5179"}
    assert metrics[3] == {"current_step": "4", "total_steps": "10", "loss": "4", "eval_loss": "6.5179"}
    assert metrics[-1] == {"current_step": "10", "total_steps": "10", "loss": "1", "eval_loss": "0.4808"}
    stamps = [status["lastUpdatedTime"] for status in statuses]
    assert stamps == sorted(stamps) and all(stamp.endswith("Z") for stamp in stamps)


def test_a_run_stopped_before_its_end_reports_where_it_stopped_and_no_remaining_time(stand_in):
    now = [0.0]
    callback = TrainJobProgress(Endpoint.from_environment(stand_in.environment()), interval=0, clock=lambda: now[0])
    run, control = state(max_steps=100), TrainerControl()
    callback.on_train_begin(None, run, control)
    for step in (1, 2, 3):
        now[0] += 1.0
        run.global_step = step
        callback.on_step_end(None, run, control)
    callback.on_train_end(None, run, control)  # SIGTERM: a checkpoint at step 3, the restart resumes
    [*_, last] = [report["trainerStatus"] for report in stand_in.reports]
    assert last["progressPercentage"] == 3 and "estimatedRemainingSeconds" not in last


def test_reports_wait_their_turn_and_the_latest_one_goes(stand_in):
    """Five reports within the interval: the first goes at once, the last after the interval, those between are
    replaced by newer ones."""
    callback = TrainJobProgress(Endpoint.from_environment(stand_in.environment()), interval=0.5)
    run, control = state(), TrainerControl()
    callback.on_train_begin(None, run, control)
    deadline = time.monotonic() + 5
    while not stand_in.reports and time.monotonic() < deadline:
        time.sleep(0.01)
    first = time.monotonic()
    for step in range(1, 5):
        run.global_step = step
        callback.on_log(None, run, control, logs={"loss": 1.0 / step})
    time.sleep(0.2)
    assert len(stand_in.reports) == 1
    if (thread := callback.sender.thread) is not None:  # the latest report, waiting for its turn
        thread.join(5)
    assert time.monotonic() - first >= 0.4
    assert [report["trainerStatus"]["progressPercentage"] for report in stand_in.reports] == [0, 40]


def recipe(report_to: Any) -> Any:
    """What the factory reads of a recipe: the report_to it set."""
    return SimpleNamespace(values={"report_to": report_to} if report_to is not None else {})


def test_only_rank_0_inside_a_trainjob_reports_and_in_place_of_transformers_callback(stand_in, caplog):
    """Outside a TrainJob nothing; inside one, sftkit's callback and not transformers', which transformers turns on
    there by itself (two would overwrite each other's reports), unless the recipe's report_to names kubeflow."""
    environment = stand_in.environment()
    assert trainjob_progress(recipe(None), SimpleNamespace(report_to=[]), environ={}) == []  # outside, or gate off
    caplog.set_level("INFO", logger="sftkit")
    args = SimpleNamespace(report_to=["tensorboard", "kubeflow"])
    assert trainjob_progress(recipe(["tensorboard", "kubeflow"]), args, environ=environment) == []
    assert args.report_to == ["tensorboard", "kubeflow"] and "report_to names kubeflow" in caplog.text
    for asked in (None, "none", "all", ["tensorboard"]):
        args = SimpleNamespace(report_to=["tensorboard", "kubeflow"])
        [callback] = trainjob_progress(recipe(asked), args, environ=environment)
        assert isinstance(callback, TrainJobProgress) and args.report_to == ["tensorboard"], asked
    run, control = state(rank_zero=False), TrainerControl()
    callback.on_train_begin(None, run, control)
    callback.on_log(None, run, control, logs={"loss": 1.0})
    callback.on_train_end(None, run, control)
    assert callback.sender is None and stand_in.reports == [] and stand_in.refused == []


def test_an_endpoint_that_is_down_or_hangs_costs_one_warning_and_no_step_any_time(tmp_path, caplog):
    """Refused connections and an endpoint that never answers: each step's callback returns at once, the run's end
    waits at most the timeout, and one warning says so."""
    caplog.set_level("WARNING", logger="sftkit")
    (tmp_path / "token").write_text("token")
    hanging = socket.socket()
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(8)  # connections are taken by the kernel, and nothing ever answers the TLS handshake
    try:
        for port, timeout in ((closed_port(), 5.0), (hanging.getsockname()[1], 0.5)):
            caplog.clear()
            endpoint = Endpoint(f"https://127.0.0.1:{port}{STATUS_PATH}", None, str(tmp_path / "token"))
            callback = TrainJobProgress(endpoint, interval=0, timeout=timeout)
            run, control = state(), TrainerControl()
            started = time.monotonic()
            callback.on_train_begin(None, run, control)
            for step in range(1, 11):
                run.global_step = step
                callback.on_step_end(None, run, control)
                callback.on_log(None, run, control, logs={"loss": 1.0})
            assert time.monotonic() - started < 0.5
            callback.on_train_end(None, run, control)
            assert time.monotonic() - started < 0.5 + 2 * timeout
            callback.sender.flush(2 * timeout)
            warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
            assert len(warnings) == 1 and warnings[0].startswith("progress: the TrainJob's status endpoint")
            assert callback.sender.sent == 0 and callback.sender.failed >= 1
    finally:
        hanging.close()


def test_a_refused_report_is_said_with_the_controllers_reason(stand_in, caplog):
    caplog.set_level("WARNING", logger="sftkit")
    other = stand_in.token_file.with_name("other-token")
    other.write_text("a token of another TrainJob")
    environment = {**stand_in.environment(), "KUBEFLOW_TRAINER_SERVER_TOKEN": str(other)}
    callback = TrainJobProgress(Endpoint.from_environment(environment), interval=0)
    callback.on_train_begin(None, state(), TrainerControl())
    callback.sender.flush(5)
    [warning] = [record.getMessage() for record in caplog.records]
    assert "HTTP 403 Forbidden" in warning and "Training goes on" in warning


# ---------------------------------------------------------------- the stand-in is as strict as the controller


def test_the_stand_in_refuses_what_the_controller_would_refuse_or_lose(stand_in):
    endpoint = Endpoint.from_environment(stand_in.environment())
    good = trainer_status(4, 10, 12.4, 0.45, None, datetime.now(timezone.utc))
    assert post(endpoint, good) == 200
    status = good["trainerStatus"]
    wrong = {
        "an unknown field": {**status, "step": 4},
        "a percentage as a float": {**status, "progressPercentage": 40.0},
        "over 100 percent": {**status, "progressPercentage": 101},
        "remaining time in milliseconds, past int32": {**status, "estimatedRemainingSeconds": 12_400 * 10**6},
        "negative remaining time": {**status, "estimatedRemainingSeconds": -1},
        "a metric value as a number": {**status, "metrics": [{"name": "loss", "value": 0.45}]},
        "a metric name past 64 characters": {**status, "metrics": [{"name": "x" * 65, "value": "1"}]},
        "an empty metric value": {**status, "metrics": [{"name": "loss", "value": ""}]},
        "no lastUpdatedTime": {key: value for key, value in status.items() if key != "lastUpdatedTime"},
        "a time that is not RFC 3339": {**status, "lastUpdatedTime": "2026-01-23 10:30:45"},
    }
    for why, body in wrong.items():
        assert post(endpoint, {"trainerStatus": body}) == 422, why
    assert post(endpoint, status) == 422  # not wrapped in {trainerStatus: ...}
    assert post(endpoint, {"trainerStatus": {**status, "metrics": []}}) == 200
    assert post(Endpoint(endpoint.url.replace("qwen-sft", "other"), endpoint.ca_cert, endpoint.token), good) == 404
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        Endpoint(endpoint.url, None, endpoint.token).post(good, timeout=5)  # the cluster's CA, not the system's
    assert len(stand_in.reports) == 2


def test_metric_values_fit_the_schema_whatever_the_loss():
    observed = datetime(2026, 1, 23, 10, 30, 45, 123456, tzinfo=timezone.utc)
    for loss in (float("nan"), float("inf"), -1e308, 1e-320, 123456789.123456789):
        body = trainer_status(10**9, 10**9 + 1, 1e12, loss, loss, observed)
        assert problems(body) == [], loss
    assert body["trainerStatus"]["lastUpdatedTime"] == "2026-01-23T10:30:45Z"
    assert body["trainerStatus"]["estimatedRemainingSeconds"] == INT32_MAX
    assert "progressPercentage" not in trainer_status(3, 0, None, None, None, observed)["trainerStatus"]


# ---------------------------------------------------------------- whole runs


@pytest.mark.slow
def test_a_run_inside_a_trainjob_reports_its_progress_and_one_outside_sends_nothing(stand_in, tmp_path, monkeypatch,
                                                                                   caplog):
    """The quickstart for 20 steps, a loss every 5, held-out losses at 0, 10, 20 and after training: the reports
    fit the schema, climb to 100% with nothing remaining, and carry both losses. The same run without the
    variables sends nothing."""
    from sftkit.jobs.train import train
    from sftkit.setup.resolve import load_recipe

    short = {"max_steps": 20, "logging_steps": 5, "eval_steps": 10, "eval_samples": 0, "save_steps": 1000}
    monkeypatch.setattr(progress, "MIN_INTERVAL_SECONDS", 0.0)
    caplog.set_level("INFO", logger="sftkit")
    for name, value in stand_in.environment().items():
        monkeypatch.setenv(name, value)
    train(load_recipe(str(QUICKSTART), {"output_dir": str(tmp_path / "inside"), **short}), save=False)

    assert stand_in.refused == []
    statuses = [report["trainerStatus"] for report in stand_in.reports]
    steps = [int(next(m["value"] for m in status["metrics"] if m["name"] == "current_step")) for status in statuses]
    percentages = [status["progressPercentage"] for status in statuses]
    assert steps == sorted(steps) and steps[-1] == 20 and percentages == [5 * step for step in steps]
    remaining = [status.get("estimatedRemainingSeconds") for status in statuses]
    assert remaining[0] is None and remaining[-1] == 0 and all(value >= 0 for value in remaining if value is not None)
    assert all(value == 0 for value, step in zip(remaining, steps) if step == 20)
    assert all(status["lastUpdatedTime"].endswith("Z") for status in statuses)  # sftkit's, none of transformers'
    last = {metric["name"]: float(metric["value"]) for metric in statuses[-1]["metrics"]}
    assert set(last) == {"current_step", "total_steps", "loss", "eval_loss"} and last["total_steps"] == 20
    assert any(m["name"] == "eval_loss" for m in statuses[0]["metrics"] + statuses[1]["metrics"])  # eval_on_start
    assert "progress: reported to the TrainJob" in caplog.text
    assert "kubectl get trainjob qwen-sft -n ml-team -o jsonpath='{.status.trainerStatus}'" in caplog.text

    sent = len(stand_in.reports)
    for name in stand_in.environment():
        monkeypatch.delenv(name)
    train(load_recipe(str(QUICKSTART), {"output_dir": str(tmp_path / "outside"), **short, "max_steps": 2,
                                        "eval_strategy": "no", "eval_on_start": False}), save=False)
    assert len(stand_in.reports) == sent and stand_in.refused == []


@pytest.mark.slow
def test_a_run_whose_endpoint_is_down_trains_to_the_end_with_one_warning(tmp_path, monkeypatch, caplog):
    from sftkit.jobs.train import train
    from sftkit.setup.resolve import load_recipe

    (tmp_path / "token").write_text("token")
    monkeypatch.setenv("KUBEFLOW_TRAINER_SERVER_URL", f"https://127.0.0.1:{closed_port()}{STATUS_PATH}")
    monkeypatch.setenv("KUBEFLOW_TRAINER_SERVER_TOKEN", str(tmp_path / "token"))
    monkeypatch.setattr(progress, "MIN_INTERVAL_SECONDS", 0.0)
    caplog.set_level("WARNING", logger="sftkit")
    output = tmp_path / "run"
    train(load_recipe(str(QUICKSTART), {"output_dir": str(output), "max_steps": 6, "logging_steps": 2,
                                        "eval_steps": 3, "eval_samples": 0}))
    assert (output / "model.safetensors").is_file()
    warnings = [record.getMessage() for record in caplog.records if record.getMessage().startswith("progress:")]
    assert len(warnings) == 1 and "did not take a report" in warnings[0]
