"""Exceptions shared across the core library."""


class Cancelled(Exception):
    """A long operation was cancelled by its caller; partial results on disk stay valid."""


class WeightsNotFound(RuntimeError):
    """No source of pretrained weights worked; the message lists what was tried."""


class ImageLoadError(ValueError):
    """An image file could not be decoded (corrupt, truncated, not an image, too large)."""
