"""Exceptions shared across the core library."""


class Cancelled(Exception):
    """A long operation was cancelled by its caller; partial results on disk stay valid."""


class WeightsNotFound(RuntimeError):
    """No source of pretrained weights worked; the message lists what was tried."""


class ImageLoadError(ValueError):
    """An image file could not be decoded (corrupt, truncated, not an image, too large)."""


class PixelLimitError(ImageLoadError):
    """An image with more pixels than allowed (a possible decompression bomb)."""

    def __init__(self, message: str, pixels: int | None, limit: int):
        super().__init__(message)
        self.pixels = pixels      # None when the decoder refused before telling the size
        self.limit = limit
