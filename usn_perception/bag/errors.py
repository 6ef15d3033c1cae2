"""Errors of the bag tools; each names the bag file and what is wrong with it."""

from __future__ import annotations

from usn_perception.errors import UsnPerceptionError


class BagError(UsnPerceptionError, ValueError):
    """A bag is missing, unreadable, or does not hold what was asked for."""

    def __init__(self, path: object, problem: str) -> None:
        """Keep the path and the problem apart, so callers can report either."""
        self.path = str(path)
        self.problem = problem
        super().__init__(f'{self.path}: {problem}')


class TopicNotFoundError(BagError):
    """The requested topic is not in the bag (the message lists the topics that are)."""


class MessageTypeError(BagError):
    """The topic exists but does not carry images."""


class EmptyBagError(BagError):
    """The bag, or the selected topic and time range, holds no messages."""


class CorruptBagError(BagError):
    """The bag cannot be read (fully): truncated, malformed, or not a bag at all.

    ``frames_read`` counts the messages of the topic delivered before the failure.
    """

    def __init__(self, path: object, problem: str, frames_read: int = 0) -> None:
        """Record how far reading got before the failure."""
        self.frames_read = frames_read
        super().__init__(path, problem)


class LabelMismatchError(BagError):
    """A label file does not fit the bag: stamps it names are not frames of the topic."""
