"""The one error type of the benchmark: a run that cannot start or whose numbers would mean nothing."""


class BenchError(Exception):
    """Shown as one line by `tgis bench` (exit 1), never as a traceback."""
