"""From CT slices in Hounsfield units to the input tensor of an ImageNet CNN.

The recipe keeps the idea of the 2017 original: three consecutive slices become
the three colour channels of one image.  Each step is a function of its own so
that it can be read and tested alone; ``prepare_volume`` runs them all, fused
for speed, and gives the same numbers as running them one after the other:

1. ``order_slices`` (lungsql.dicom.series): slices sorted by their position along the body axis
   (never by InstanceNumber, which scanners number in any order);
2. ``window``: the lung window (-1000..400 HU by default) mapped linearly onto
   0..255 and clipped, identical for every slice and every patient (the
   original scaled each slice by its own maximum);
3. ``body_crop`` and ``crop_resize``: one square around the body, found over
   the whole volume so that every slice of a patient gets the same crop, then
   resized to ``image_size`` (``Resampler``: the mean of blocks of pixels,
   then a bilinear step that shrinks by less than 1.5, which averages every
   pixel as area averaging does at a fraction of its cost);
4. ``pack_groups``: slices (0, 1, 2), (3, 4, 5)... as the channels of one
   image each; the last image is completed by repeating the last slice (the
   original dropped the last one to three slices);
5. ``normalize``: ``(value - mean) / std`` per channel, with the mean and
   standard deviation the CNN was trained with (0..255 units).

``Preprocessing`` holds every number of the recipe.  It is stored as JSON next
to the model that was trained on its output, so that the same recipe is
applied when that model scores new patients.

``prepare_volume`` also takes the slices as stored in the DICOM files
(integers) with the rescale of each slice to HU, and then works on those
integers directly: featurization never builds float32 HU slices.
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import cv2
import numpy as np

# Preprocessing runs in one thread beside the CNN's (lungsql.ml.featurize): OpenCV's
# own worker threads would only compete with them for the same cores.
cv2.setNumThreads(1)

from lungsql.errors import ConfigurationError, LungSQLError

#: Version of the recipe written by ``Preprocessing.to_json``.  Bump it when a
#: step changes what it computes, so that stored models say which one they saw.
RECIPE_VERSION = 1

#: How a square crop becomes ``image_size`` pixels wide (``Preprocessing.resampling``).
RESAMPLINGS = {
    "box": "the mean of k x k blocks, k = side // image size, then bilinear (see Resampler)",
    "area": "OpenCV's area averaging straight to the image size (recipes stored before 'box' existed)",
}


@dataclass(frozen=True)
class Preprocessing:
    """Every number of the preprocessing recipe (see the module docstring).

    ``mean`` and ``std`` are per channel, in 0..255 units, and must be those
    the CNN was trained with.  ``body_threshold_hu`` and ``body_margin`` decide
    the crop: the body is every pixel above the threshold, and the square
    around it is widened by ``body_margin`` of its side on each side.
    """

    image_size: int = 224
    hu_window: tuple[float, float] = (-1000.0, 400.0)
    mean: tuple[float, ...] = (127.5, 127.5, 127.5)
    std: tuple[float, ...] = (127.5, 127.5, 127.5)
    slices_per_image: int = 3
    body_threshold_hu: float = -500.0
    body_margin: float = 0.02
    resampling: str = "box"

    def __post_init__(self) -> None:
        # Normalise types first (JSON gives lists, settings may give ints).
        try:
            for name in ("hu_window", "mean", "std"):
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
            for name in ("body_threshold_hu", "body_margin"):
                object.__setattr__(self, name, float(getattr(self, name)))
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"preprocessing {name} is not a number or a list of numbers: {exc}") from None
        for name, hint in (("image_size", "use the input size of the CNN, e.g. 224"),
                           ("slices_per_image", "use the number of input channels of the CNN, 3 for ImageNet")):
            value = getattr(self, name)
            try:
                number = operator.index(value)
            except TypeError:
                number = 0
            if isinstance(value, bool) or number < 1:
                raise ConfigurationError(f"{name} must be a positive integer, got {value!r}", hint)
            object.__setattr__(self, name, int(number))
        if len(self.hu_window) != 2 or not self.hu_window[0] < self.hu_window[1]:
            raise ConfigurationError(f"hu_window must be (LOW, HIGH) with LOW < HIGH, got {self.hu_window!r}",
                                     "the lung window is (-1000.0, 400.0)")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != self.slices_per_image:
                raise ConfigurationError(
                    f"{name} has {len(values)} values but an image has {self.slices_per_image} channels",
                    f"give one {name} per channel, in 0..255 units")
            if not all(math.isfinite(v) for v in values):
                raise ConfigurationError(f"{name} must be finite numbers, got {values!r}")
        if not all(v > 0 for v in self.std):
            raise ConfigurationError(f"std must be positive, got {self.std!r}")
        if not 0.0 <= self.body_margin < 1.0:
            raise ConfigurationError(f"body_margin must be in [0, 1), got {self.body_margin!r}")
        if self.resampling not in RESAMPLINGS:
            raise ConfigurationError(f"resampling must be one of {sorted(RESAMPLINGS)}, got {self.resampling!r}",
                                     "'box' is the default")

    @classmethod
    def from_settings(
        cls,
        mean: Sequence[float] = (127.5, 127.5, 127.5),
        std: Sequence[float] = (127.5, 127.5, 127.5),
    ) -> Preprocessing:
        """The recipe for a CNN trained with `mean` and `std`, image size and
        HU window from LUNGSQL_IMAGE_SIZE and LUNGSQL_HU_WINDOW."""
        import config_preprocessing

        return cls(
            image_size=int(config_preprocessing.get("LUNGSQL_IMAGE_SIZE")),
            hu_window=tuple(config_preprocessing.get("LUNGSQL_HU_WINDOW")),
            mean=tuple(mean),
            std=tuple(std),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (lists for tuples), with the recipe version."""
        data: dict[str, Any] = {"version": RECIPE_VERSION}
        for key, value in asdict(self).items():
            data[key] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Preprocessing:
        """The recipe stored by `to_json`.  Keys it lacks take their defaults
        (a field added later must default to what older records meant), except
        ``resampling``, which older records leave out and meant ``"area"``."""
        if not isinstance(data, dict):
            raise ConfigurationError(f"stored preprocessing must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        data.setdefault("resampling", "area")  # what every recipe stored before the field existed used
        version = data.pop("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise ConfigurationError(
                f"stored preprocessing has recipe version {version!r}; this lungsql knows {RECIPE_VERSION}",
                "upgrade lungsql to score with this model, or train the model again")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigurationError(f"stored preprocessing has unknown keys {unknown}",
                                     f"known keys: {sorted(known)}")
        return cls(**data)


# ----------------------------------------------------------------------------- steps


def window(hu: np.ndarray, low: float = -1000.0, high: float = 400.0, dtype=np.float32) -> np.ndarray:
    """Map [low, high] HU linearly onto [0, 255], clipping outside.

    float32 by default; ``dtype=np.uint8`` rounds to the nearest integer.
    """
    if not low < high:
        raise ValueError(f"window needs low < high, got {low}, {high}")
    out = np.clip(np.asarray(hu, dtype=np.float32), np.float32(low), np.float32(high))
    out -= np.float32(low)
    out *= np.float32(255.0 / (high - low))
    if np.dtype(dtype) == np.uint8:
        return np.rint(out, out=out).astype(np.uint8)
    return out.astype(dtype, copy=False)


@dataclass(frozen=True)
class SquareCrop:
    """A square of `side` pixels whose top-left corner is (`top`, `left`).

    It may reach outside the image (an image narrower than the body's square);
    what lies outside counts as air.
    """

    top: int
    left: int
    side: int

    def inside(self, rows: int, cols: int) -> tuple[slice, slice, slice, slice]:
        """(image rows, image cols, square rows, square cols) of the overlap."""
        r0, r1 = max(self.top, 0), min(self.top + self.side, rows)
        c0, c1 = max(self.left, 0), min(self.left + self.side, cols)
        return (slice(r0, r1), slice(c0, c1),
                slice(r0 - self.top, r1 - self.top), slice(c0 - self.left, c1 - self.left))


def body_crop(hu_slices: Sequence[np.ndarray] | np.ndarray, threshold: float = -500.0,
              margin: float = 0.02) -> SquareCrop:
    """The square around the body over the whole volume (one for all slices).

    A row or column belongs to the body's box when at least 1% of its pixels
    (at least one) are above `threshold` HU in some slice, so isolated noisy
    pixels in the air do not widen it.  The square has the box's longer side
    plus `margin` on each side, is centred on the box and is moved inside the
    image where it fits.  With no body found, the square covers the image.
    """
    return _square_around(_max_projection(_as_slices(hu_slices)) > threshold, margin)


def _max_projection(slices: list[np.ndarray]) -> np.ndarray:
    """The largest value of each pixel over the slices, in their own type (int16 stays int16)."""
    projection = np.array(slices[0], dtype=np.result_type(*slices))
    for s in slices[1:]:
        np.maximum(projection, s, out=projection)
    return projection


def _square_around(body: np.ndarray, margin: float) -> SquareCrop:
    """`body_crop`'s square for a mask of the pixels that belong to the body."""
    rows, cols = body.shape
    row_hits = np.flatnonzero(body.sum(axis=1) >= max(1, math.ceil(0.01 * cols)))
    col_hits = np.flatnonzero(body.sum(axis=0) >= max(1, math.ceil(0.01 * rows)))
    if row_hits.size == 0 or col_hits.size == 0:
        r0, r1, c0, c1, extra = 0, rows, 0, cols, 0
    else:
        r0, r1, c0, c1 = row_hits[0], row_hits[-1] + 1, col_hits[0], col_hits[-1] + 1
        extra = 2 * math.ceil(margin * max(r1 - r0, c1 - c0))
    side = int(max(r1 - r0, c1 - c0) + extra)
    return SquareCrop(_place(int(r0), int(r1), side, rows), _place(int(c0), int(c1), side, cols), side)


def _place(start: int, stop: int, side: int, size: int) -> int:
    """First index of a span of `side` centred on [start, stop), kept inside [0, size) if it fits."""
    first = (start + stop - side) // 2
    if side >= size:
        return (size - side) // 2  # centre the image in the square
    return min(max(first, 0), size - side)


class Resampler:
    """Resizes `side` x `side` float32 squares to `size` x `size` with one of RESAMPLINGS.

    ``"box"`` averages k x k blocks, k = side // size (OpenCV's area
    averaging at a whole-number ratio, which is fast), then resizes the
    result bilinearly, which shrinks it by less than 1.5 when k >= 2.  A
    square between 1.5 and 2 times `size` is first enlarged bilinearly to
    twice `size` and then averaged in 2 x 2 blocks, so that the bilinear step
    never shrinks by more than 1.5 and every pixel counts, as with area
    averaging.  When side is not a multiple of k, the block step leaves out
    the last side % k (< k) rows and columns, half on each side.
    ``"area"`` is OpenCV's area averaging straight to `size`, several times
    slower when side / size is not a whole number.  Both enlarge a square
    smaller than `size` bilinearly: area averaging would make it blocky.
    """

    def __init__(self, side: int, size: int, method: str = "box") -> None:
        if method not in RESAMPLINGS:
            raise ConfigurationError(f"resampling must be one of {sorted(RESAMPLINGS)}, got {method!r}")
        self.side, self.size = side, size
        self._cut = slice(0, side)
        self._work: np.ndarray | None = None
        if side < size or (method == "box" and side <= 1.5 * size):
            self._steps = [cv2.INTER_LINEAR]
        elif method == "area" or side % size == 0:
            self._steps = [cv2.INTER_AREA]
        elif side < 2 * size:  # box, 1.5 to 2 times: enlarge to twice the size, then 2 x 2 blocks
            self._work = np.empty((2 * size, 2 * size), np.float32)
            self._steps = [cv2.INTER_LINEAR, cv2.INTER_AREA]
        else:  # box, k x k blocks, then bilinear
            k = side // size
            kept = side // k * k
            self._cut = slice((side - kept) // 2, (side - kept) // 2 + kept)
            self._work = np.empty((kept // k, kept // k), np.float32)
            self._steps = [cv2.INTER_AREA, cv2.INTER_LINEAR]

    def __call__(self, square: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty((self.size, self.size), np.float32)
        square = square[self._cut, self._cut]
        if self._work is not None:
            square = cv2.resize(square, self._work.shape[::-1], dst=self._work, interpolation=self._steps[0])
        return cv2.resize(square, (self.size, self.size), dst=out, interpolation=self._steps[-1])


def crop_resize(images: Sequence[np.ndarray] | np.ndarray, crop: SquareCrop, size: int,
                fill: float = 0.0, resampling: str = "box") -> np.ndarray:
    """Cut `crop` out of every image (`fill` outside the image) and resize it
    to `size` x `size` with `resampling`: float32 (n, size, size)."""
    slices = _as_slices(images)
    rows, cols = slices[0].shape
    out = np.empty((len(slices), size, size), np.float32)
    src_r, src_c, dst_r, dst_c = crop.inside(rows, cols)
    square = np.full((crop.side, crop.side), fill, np.float32)
    resize = Resampler(crop.side, size, resampling)
    for i, image in enumerate(slices):
        square[dst_r, dst_c] = image[src_r, src_c]
        resize(square, out[i])
    return out


def fits_input(shape: Sequence, p: Preprocessing) -> bool:
    """Whether a CNN's NCHW input shape (a name or None for a dynamic dimension) takes the images
    this preprocessing makes: (any, slices_per_image, image_size, image_size)."""
    want = [None, p.slices_per_image, p.image_size, p.image_size]
    return len(shape) == 4 and not any(isinstance(h, int) and w is not None and h != w for h, w in zip(shape, want))


def pack_groups(slices: np.ndarray, slices_per_image: int = 3) -> np.ndarray:
    """(n, S, S) slices -> (ceil(n / k), k, S, S) images of k consecutive slices.

    Channel c of image g is slice g*k + c; the last image is completed with
    copies of the last slice, so no slice is lost.
    """
    slices = np.asarray(slices)
    if slices.ndim != 3 or slices.shape[0] == 0:
        raise ValueError(f"pack_groups needs (n >= 1, S, S) slices, got shape {slices.shape}")
    n, k = slices.shape[0], slices_per_image
    groups = math.ceil(n / k)
    index = np.minimum(np.arange(groups * k), n - 1)
    return slices[index].reshape(groups, k, *slices.shape[1:])


def normalize(groups: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(value - mean[c]) / std[c] on channel c of (n, C, S, S) images: float32."""
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return ((np.asarray(groups, np.float32) - m) / s).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- all steps


def volume_crop(slices: Sequence[np.ndarray] | np.ndarray, p: Preprocessing = Preprocessing(),
                rescale: Sequence[tuple[float, float]] | np.ndarray | None = None) -> SquareCrop:
    """The square around the body that `prepare_volume` cuts out of every slice of the series."""
    slices = _as_slices(slices)
    slope, intercept = _rescale(rescale, len(slices))
    if np.all(slope == slope[0]) and np.all(intercept == intercept[0]):
        threshold = (p.body_threshold_hu - intercept[0]) / slope[0]
        return _square_around(_max_projection(slices) > threshold, p.body_margin)
    # slices rescaled differently: find the body in HU
    return body_crop([s * np.float32(a) + np.float32(b) for s, a, b in zip(slices, slope, intercept)],
                     p.body_threshold_hu, p.body_margin)


def prepare_volume(slices: Sequence[np.ndarray] | np.ndarray, p: Preprocessing = Preprocessing(),
                   rescale: Sequence[tuple[float, float]] | np.ndarray | None = None,
                   crop: SquareCrop | None = None) -> np.ndarray:
    """The CNN input of one series: float32 (ceil(n / k), k, S, S).

    `slices` are 2-D arrays of one size, already in z order (see
    `lungsql.dicom.series.order_slices`): Hounsfield units, or, with `rescale`, the values stored
    in the DICOM files and one (slope, intercept) per slice, HU = slope x
    stored + intercept.  Same numbers as window, body_crop, crop_resize,
    pack_groups and normalize one after the other, computed as: clip to the
    window (in the slices' own units), crop and resize, then one affine map
    per slice that does the rescale, the window's scaling and the
    normalisation together (resizing averages linearly, so mapping before or
    after it is the same). `crop`, when given, replaces the square `volume_crop` finds (a part of
    a series prepared as the whole series was).
    """
    slices = _as_slices(slices)
    n, k, size = len(slices), p.slices_per_image, p.image_size
    rows, cols = slices[0].shape
    slope, intercept = _rescale(rescale, n)
    low, high = p.hu_window
    lows, highs = (low - intercept) / slope, (high - intercept) / slope  # the window in stored units
    if crop is None:
        crop = volume_crop(slices, p, rescale)
    src_r, src_c, dst_r, dst_c = crop.inside(rows, cols)
    resize = Resampler(crop.side, size, p.resampling)

    groups = math.ceil(n / k)
    out = np.empty((groups * k, size, size), np.float32)
    square = np.full((crop.side, crop.side), lows[0], np.float32)
    inner = square[dst_r, dst_c]
    air = lows[0]  # what the part of the square outside the image holds
    for i, image in enumerate(slices):
        if lows[i] != air and inner.size != square.size:
            square.fill(lows[i])
            air = lows[i]
        if image.dtype.kind in "iu" and _integral_within(lows[i], highs[i], image.dtype):
            # Clipped as the stored integers and cast to float32 on the way out, in one pass over the
            # slice (no integer copy to cast afterwards): the same numbers as clipping in float32, faster.
            np.clip(image[src_r, src_c], int(lows[i]), int(highs[i]), out=inner)
        else:
            np.clip(image[src_r, src_c], np.float32(lows[i]), np.float32(highs[i]), out=inner)
        resize(square, out[i])
    out[n:] = out[n - 1]

    # hu = slope * x + intercept; value_255 = (hu - low) * 255 / (high - low); result = (value_255 - mean) / std
    last = np.full(groups * k - n, n - 1)
    per_slice = np.concatenate([np.arange(n), last])
    channel = np.arange(groups * k) % k
    to_255 = 255.0 / (high - low)
    mean, std = np.asarray(p.mean)[channel], np.asarray(p.std)[channel]
    scale = (slope[per_slice] * to_255 / std).astype(np.float32).reshape(-1, 1, 1)
    shift = (((intercept[per_slice] - low) * to_255 - mean) / std).astype(np.float32).reshape(-1, 1, 1)
    out *= scale
    out += shift
    return out.reshape(groups, k, size, size)


def _integral_within(low: float, high: float, dtype: np.dtype) -> bool:
    """Both window ends are whole numbers that the stored integer type holds."""
    info = np.iinfo(dtype)
    return float(low).is_integer() and float(high).is_integer() and info.min <= low <= high <= info.max


def _rescale(rescale: Sequence[tuple[float, float]] | np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(slopes, intercepts) as float64 arrays of n, checked."""
    if rescale is None:
        return np.ones(n), np.zeros(n)
    pairs = np.asarray(rescale, np.float64)
    if pairs.shape != (n, 2):
        raise ValueError(f"rescale must hold one (slope, intercept) per slice: {n} pairs, got shape {pairs.shape}")
    slope, intercept = pairs[:, 0].copy(), pairs[:, 1].copy()
    bad = np.flatnonzero(~(np.isfinite(slope) & np.isfinite(intercept) & (slope > 0)))
    if bad.size:
        raise LungSQLError(f"slices {bad[:5].tolist()} have a rescale slope that is not a positive number "
                           f"(or an intercept that is not finite)",
                           "check RescaleSlope and RescaleIntercept of those files")
    return slope, intercept


def _as_slices(hu_slices: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
    """A list of 2-D arrays of one shape, or a readable error."""
    if isinstance(hu_slices, np.ndarray):
        if hu_slices.ndim != 3:
            raise ValueError(f"expected a (n, rows, cols) volume, got shape {hu_slices.shape}")
        slices = list(hu_slices)
    else:
        slices = [np.asarray(s) for s in hu_slices]
    if not slices:
        raise LungSQLError("the series has no slices", "store at least one CT slice of the patient")
    shape = slices[0].shape
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"each slice must be a non-empty 2-D array, got shape {shape}")
    for i, s in enumerate(slices):
        if s.shape != shape:
            raise LungSQLError(
                f"slices of one series differ in size: slice 0 is {shape[0]}x{shape[1]}, "
                f"slice {i} is {'x'.join(map(str, s.shape))}",
                "featurize one series at a time; a series whose slices differ in size is not a volume")
    return slices


# ----------------------------------------------------------------------------- radiographs


def prepare_radiographs(images: Sequence[np.ndarray], p: Preprocessing = Preprocessing()) -> np.ndarray:
    """The CNN input of radiographs: float32 (n, C, S, S).

    Each image is the whole radiograph as displayed (2-D, 0 black .. 1 white, lungsql.dicom.radiograph
    decodes it so), resized to S x S (area averaging; no crop, no CT window), put on 0..255, copied
    to the C channels and normalized with the CNN's mean and std."""
    import cv2

    size, channels = p.image_size, p.slices_per_image
    out = np.empty((len(images), channels, size, size), np.float32)
    mean = np.asarray(p.mean, np.float32)
    std = np.asarray(p.std, np.float32)
    for i, image in enumerate(images):
        image = np.asarray(image, np.float32)
        if image.ndim != 2 or min(image.shape) < 1:
            raise ValueError(f"a radiograph is one 2-D image; got shape {image.shape}")
        resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA) * np.float32(255.0)
        for c in range(channels):
            np.subtract(resized, mean[c % len(mean)], out=out[i, c])
            out[i, c] /= std[c % len(std)]
    return out
