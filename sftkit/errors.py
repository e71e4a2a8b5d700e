"""The one exception type users see: a message that says what is wrong, where, and what to do."""


class SftkitError(Exception):
    """An error caused by the user's recipe, data or environment; printed without a traceback."""
