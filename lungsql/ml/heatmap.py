"""Where in a slice: a class-activation map from the CNN's last feature map.

The built-in CNNs give their last feature map (1280 x 7 x 7 for EfficientNet-Lite0) beside the
pooled features, which are its spatial mean. A group of slices' contribution to the probability
is, feature by feature, `lungsql.ml.explain.attribution`; weighting the feature map's channels by
those contributions and keeping what is positive gives, cell by cell, where in the group's image
the features that raised the probability were strongest. The map is scaled up to the square the
preprocessing cut around the body and placed back on the slice's own pixels.

It is an aid to reading the scan, not a diagnosis: it shows where the model's features responded,
not that anything is there.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

from lungsql.errors import IntegrityError
from lungsql.ml.preprocess import SquareCrop

_sessions: OrderedDict[str, object] = OrderedDict()
_sessions_lock = threading.Lock()


def feature_map_session(model: bytes, sha256: str):
    """An ONNX Runtime session of a stored CNN for its feature map, kept per process (two CNNs);
    the bytes are checked against their SHA-256 on every call."""
    import onnxruntime as ort

    if hashlib.sha256(model).hexdigest() != sha256:
        raise IntegrityError("the CNN's bytes do not match their SHA-256: the stored model was altered",
                             hint="import the CNN again: lungsql model import ...")
    with _sessions_lock:
        found = _sessions.get(sha256)
        if found is not None:
            _sessions.move_to_end(sha256)
            return found
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    with _sessions_lock:
        _sessions[sha256] = session
        while len(_sessions) > 2:
            _sessions.popitem(last=False)
    return session


def activation_map(feature_map: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(h, w) float32 in [0, 1]: the channels of a (D, h, w) feature map weighted by (D,) contributions,
    what is above zero, divided by its maximum (all zero when nothing raised the probability)."""
    f = np.asarray(feature_map, np.float32)
    cam = np.tensordot(np.asarray(weights, np.float32), f, axes=(0, 0))
    cam = np.maximum(cam, 0.0)
    peak = float(cam.max()) if cam.size else 0.0
    return (cam / peak).astype(np.float32) if peak > 0 else np.zeros_like(cam, np.float32)


def on_slice(cam: np.ndarray, crop: SquareCrop, rows: int, cols: int) -> np.ndarray:
    """The map over the slice's pixels: scaled up to the body's square, placed where the square lies
    (0 outside it): float32 (rows, cols) in [0, 1]."""
    import cv2

    square = cv2.resize(np.asarray(cam, np.float32), (crop.side, crop.side), interpolation=cv2.INTER_LINEAR)
    out = np.zeros((rows, cols), np.float32)
    src_r, src_c, dst_r, dst_c = crop.inside(rows, cols)
    out[src_r, src_c] = square[dst_r, dst_c]
    return np.clip(out, 0.0, 1.0)


def occlusion_map(session, input_name: str, output_name: str, image: np.ndarray, weights: np.ndarray,
                  cells: int = 7) -> np.ndarray:
    """(cells, cells) float32 in [0, 1], for a CNN without a feature map output: the group's image
    with one cell of a cells x cells grid blanked (set to 0, the normalized mean) at a time, all in
    one batch of forward passes, and how much each blanking lowers the group's contribution, to first
    order: the (D,) `weights` times the change of the pooled features."""
    image = np.asarray(image, np.float32)
    _, channels, rows, cols = image.shape
    edges_r = np.linspace(0, rows, cells + 1).round().astype(int)
    edges_c = np.linspace(0, cols, cells + 1).round().astype(int)
    batch = np.repeat(image, cells * cells + 1, axis=0)  # the first one left whole
    for i in range(cells):
        for j in range(cells):
            batch[1 + i * cells + j, :, edges_r[i]:edges_r[i + 1], edges_c[j]:edges_c[j + 1]] = 0.0
    (features,) = session.run([output_name], {input_name: batch})
    features = np.asarray(features, np.float32).reshape(len(batch), -1)
    drop = (features[0] - features[1:]) @ np.asarray(weights, np.float32)
    cam = np.maximum(drop.reshape(cells, cells), 0.0)
    peak = float(cam.max())
    return (cam / peak).astype(np.float32) if peak > 0 else np.zeros_like(cam, np.float32)
