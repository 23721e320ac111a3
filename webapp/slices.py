"""CT slices as PNG images in the lung window, from the pixels the database renders.

The database decodes the stored DICOM and maps it through the window
(``lungsql.slice_image``): the web app's role never reads a DICOM file, and
the web app never parses one. Here the rows x columns bytes only become a PNG.
Renderings are kept in an in-process LRU cache keyed by the DICOM file's
SHA-256 (stored with the scan) and the window, bounded in bytes; browsers
cache them too (the same ETag).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from lungsql.errors import ConfigurationError, InvalidScan


def encode_png(rows: int, columns: int, pixels: bytes) -> bytes:
    """`pixels` (rows x columns uint8, row by row) as a greyscale PNG."""
    try:
        import cv2
    except ImportError:
        raise ConfigurationError("showing CT slices needs OpenCV",
                                 hint="install lungsql's ml extra: pip install -e '.[ml]'") from None
    if rows <= 0 or columns <= 0 or len(pixels) != rows * columns:
        raise InvalidScan(f"the database returned {len(pixels)} bytes for a slice of {rows} x {columns} pixels")
    image = np.frombuffer(pixels, dtype=np.uint8).reshape(rows, columns)
    ok, png = cv2.imencode(".png", image)
    if not ok:
        raise ConfigurationError("OpenCV could not encode the slice as PNG")
    return png.tobytes()


def encode_heatmap_png(rows: int, columns: int, heat: bytes) -> bytes:
    """A heat map (rows x columns uint8) as a transparent PNG to lay over the slice: one warm colour,
    more opaque where the map is stronger, clear where it is zero."""
    import cv2

    if rows <= 0 or columns <= 0 or len(heat) != rows * columns:
        raise InvalidScan(f"the database returned {len(heat)} bytes for a heat map of {rows} x {columns} pixels")
    level = np.frombuffer(heat, dtype=np.uint8).reshape(rows, columns)
    image = np.empty((rows, columns, 4), np.uint8)
    image[..., 0] = 0                                    # blue
    image[..., 1] = (level.astype(np.uint16) * 160 // 255).astype(np.uint8)  # green: orange to yellow
    image[..., 2] = 255                                  # red
    image[..., 3] = (level.astype(np.uint16) * 170 // 255).astype(np.uint8)  # at most two thirds opaque
    ok, png = cv2.imencode(".png", image)
    if not ok:
        raise ConfigurationError("OpenCV could not encode the heat map as PNG")
    return png.tobytes()


class PngCache:
    """A thread-safe LRU of rendered slices, at most `max_bytes` of PNG in all."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> bytes | None:
        with self._lock:
            png = self._items.get(key)
            if png is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return png

    def put(self, key: str, png: bytes) -> None:
        if len(png) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._items[key] = png
            self._size += len(png)
            while self._size > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped)

    def __len__(self) -> int:
        return len(self._items)
