"""Errors a user can cause. `str(error)` is one clear sentence that the chat shows as it is."""

from core.vlm.loader import ModelNotInstalled


class UserError(Exception):
    """Base of every error caused by what a user sent; never shown with a traceback."""


class BadImage(UserError):
    """Not an image, truncated, too large, or a decompression bomb."""


class UnknownMosaic(UserError):
    """No mosaic by that name in this scope."""


class MosaicExists(UserError):
    """A mosaic by that name already exists in this scope."""


class BadCoordinate(UserError):
    """A tile coordinate that does not parse or lies off the grid."""


class BadQuestion(UserError):
    """An empty or overlong question."""


class QueueFull(UserError):
    """The job queue, or this user's share of it, is full."""


class UnknownConversation(UserError):
    """A follow-up to a question that is unknown here, not answered, or from another platform."""


class ConversationTooLong(UserError):
    """A follow-up beyond the most questions one conversation may have."""


class EmptyLibrary(UserError):
    """A mosaic was requested before any car photo was added."""


class LibraryTooSmall(UserError):
    """The library cannot fill the grid under the requested per-photo use limit."""


class BadMosaicName(UserError):
    """A mosaic name that is empty or too long."""


class BadMosaicOptions(UserError):
    """Mosaic options out of range, or a grid too large to render."""


__all__ = [
    "BadCoordinate",
    "BadImage",
    "BadMosaicName",
    "BadMosaicOptions",
    "BadQuestion",
    "ConversationTooLong",
    "EmptyLibrary",
    "LibraryTooSmall",
    "ModelNotInstalled",
    "MosaicExists",
    "QueueFull",
    "UnknownConversation",
    "UnknownMosaic",
    "UserError",
]
