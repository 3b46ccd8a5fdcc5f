"""The project's user-facing errors: each message is one line naming what is wrong and where."""

from __future__ import annotations


class MaXDeepLabError(Exception):
    """Base class: the CLI prints `error: <message>` without a traceback (unless --debug)."""


class ConfigError(MaXDeepLabError):
    """A config or sweep YAML is invalid (names the file, the key and the value)."""


class DataError(MaXDeepLabError):
    """A dataset file is missing, corrupt or inconsistent (names the file, image or segment)."""


class EvaluationError(MaXDeepLabError):
    """Ground truth and predictions cannot be evaluated together (names the image and segment)."""


class ClusterError(MaXDeepLabError):
    """A Ray cluster's job server cannot be reached or refuses a request (names its address)."""


class CheckpointError(MaXDeepLabError):
    """A checkpoint is incomplete, corrupt or holds non-finite tensors (names its path)."""
