"""CT slices as PNG images in the lung window, rendered from the stored DICOM.

Renderings are kept in an in-process LRU cache keyed by the DICOM file's
SHA-256 (stored with the scan), bounded in bytes; browsers cache them too
(ETag = that SHA-256).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from lungsql import dicom, preprocess
from lungsql.errors import ConfigurationError, InvalidScan


def render_png(data: bytes, window: tuple[float, float]) -> bytes:
    """One DICOM file's first frame, in Hounsfield units mapped through `window` to 0-255, as PNG."""
    try:
        import cv2
    except ImportError:
        raise ConfigurationError("showing CT slices needs OpenCV",
                                 hint="install lungsql's ml extra: pip install -e '.[ml]'") from None
    ds = dicom.parse(data)
    try:
        hu = dicom.hounsfield(ds)
    except Exception as exc:  # pydicom raises many kinds on pixels it cannot decode
        raise InvalidScan(f"cannot decode the pixels of this slice: {str(exc).strip().splitlines()[0]}",
                          hint=dicom.CODECS_HINT) from None
    if hu.ndim == 3:  # multi-frame: the first frame
        hu = hu[0]
    image = preprocess.window(hu, window[0], window[1], dtype=np.uint8)
    ok, png = cv2.imencode(".png", image)
    if not ok:
        raise ConfigurationError("OpenCV could not encode the slice as PNG")
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
