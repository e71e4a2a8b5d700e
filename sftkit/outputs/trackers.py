"""Trackers (``report_to``): each one checked before any data is read, and where it writes logged with the command
that opens its dashboard.

Nothing is reported anywhere unless ``report_to`` names a tracker (its default is none). TensorBoard writes event
files under ``output_dir/runs``; trackio writes a local database, and sends to a Hugging Face Space only when
``trackio_space_id`` (or trackio's own ``TRACKIO_SPACE_ID`` or ``TRACKIO_SERVER_URL``) names one.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path

from trl import SFTConfig

from sftkit.errors import SftkitError

logger = logging.getLogger(__name__)

INSTALL = "pip install 'sftkit[trackers]'"
IN_EXTRA = ("tensorboard", "trackio")  # the trackers the extra installs


def check_trackers(args: SFTConfig) -> None:
    """Every tracker of ``report_to`` is known and installed; log where each writes."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    installed = get_available_reporting_integrations()
    for name in args.report_to:
        if name not in INTEGRATION_TO_CALLBACK:
            match = difflib.get_close_matches(name, list(INTEGRATION_TO_CALLBACK), n=1)
            hint = f"; did you mean {match[0]}?" if match else ""
            raise SftkitError(f"report_to: {name!r} is not a tracker{hint} (trackers: "
                              f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}; or none)")
        if name not in installed:
            install = INSTALL if name in IN_EXTRA else f"install the {name} package"
            raise SftkitError(f"report_to: {name} is not installed: {install}, or remove it from report_to")
        logger.info("trackers: %s", destination(name, args))


def destination(name: str, args: SFTConfig) -> str:
    """Where tracker ``name`` writes, and how to see it."""
    if name == "tensorboard":
        directory = os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs")
        return f"tensorboard writes event files under {directory}; see them with: tensorboard --logdir {directory}"
    if name == "trackio":
        space = args.trackio_space_id or os.environ.get("TRACKIO_SPACE_ID")
        if space:
            return f"trackio sends metrics to the Hugging Face Space {space}"
        if server := os.environ.get("TRACKIO_SERVER_URL"):
            return f"trackio sends metrics to the server {server} (TRACKIO_SERVER_URL)"
        return (f"trackio writes project {args.project!r} to {trackio_directory()}; see it with: "
                f"trackio show --project {args.project}")
    if name == "kubeflow":  # set by transformers itself inside a TrainJob whose controller takes progress reports
        return ("progress, remaining time and losses go to the TrainJob's status.trainerStatus (kubectl get trainjob "
                "NAME -o jsonpath='{.status.trainerStatus}')")
    return f"{name} reports where its own settings say"


def trackio_directory() -> Path:
    """Where trackio keeps its local databases: ``TRACKIO_DIR``, else ``trackio`` in the Hugging Face home."""
    from huggingface_hub import constants

    return Path(os.environ.get("TRACKIO_DIR") or Path(constants.HF_HOME) / "trackio")
