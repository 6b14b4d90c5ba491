"""Exceptions shared across the core library."""


class Cancelled(Exception):
    """A long operation was cancelled by its caller; partial results on disk stay valid."""


class WeightsNotFound(RuntimeError):
    """No source of pretrained weights worked; the message lists what was tried."""


class ImageLoadError(ValueError):
    """An image file could not be decoded (corrupt, truncated, not an image, too large).

    `path` is the file, `reason` the words without it; str() is "<path>: <reason>".
    """

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):   # picklable across worker processes
        return (type(self), (self.path, self.reason))


class PixelLimitError(ImageLoadError):
    """An image with more pixels than allowed (a possible decompression bomb)."""

    def __init__(self, path, reason: str, pixels: int | None, limit: int):
        super().__init__(path, reason)
        self.pixels = pixels      # None when the decoder refused before telling the size
        self.limit = limit

    def __reduce__(self):
        return (type(self), (self.path, self.reason, self.pixels, self.limit))
