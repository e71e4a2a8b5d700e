"""The one exception type users see: a message that says what is wrong, where, and what to do."""


class SftkitError(Exception):
    """An error caused by the user's recipe, data or environment; printed without a traceback."""


class StoppedBySignal(SftkitError):
    """The run stopped on SIGTERM (or SLURM's SIGUSR1) after saving a checkpoint: not finished, and resumable."""

    exit_code = 128 + 15  # what a process ended by SIGTERM reports, so schedulers restart it
