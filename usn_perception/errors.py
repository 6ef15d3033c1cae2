"""Exception types shared by the core, the CLI and the ROS fronts.

Every error names the thing that is wrong (file, entry, layer) so that a CLI can print it and
exit non-zero, and the node can log it and keep running.
"""

from __future__ import annotations


class UsnPerceptionError(Exception):
    """Base class for every error this package raises on purpose."""


class DatasetError(UsnPerceptionError, ValueError):
    """A dataset file (COCO JSON, image) is missing, malformed or inconsistent."""

    def __init__(self, path: object, problem: str, entry: str | None = None) -> None:
        self.path = str(path)
        self.problem = problem
        self.entry = entry
        where = f'{self.path}' + (f' [{entry}]' if entry else '')
        super().__init__(f'{where}: {problem}')


class ModelFileError(UsnPerceptionError, ValueError):
    """A model file is missing, corrupt, truncated, pickled or does not match its JSON."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f'{self.path}: {problem}')


class UnsupportedLayerError(UsnPerceptionError, TypeError):
    """The bound engine met a layer it cannot bound soundly."""


class ImageError(UsnPerceptionError, ValueError):
    """An input image is empty, has the wrong shape or dtype, or holds NaN/inf pixels."""
