"""An INT8 variant of a CNN: static quantization in the QDQ format, calibrated on CT slices.

ONNX Runtime's quantizer (onnxruntime.quantization.quantize_static) puts
QuantizeLinear / DequantizeLinear pairs around the convolutions, additions and
activations: weights as int8 with a scale per output channel, activations as
uint8 with one scale and zero point per tensor, each range taken from the CNN's
own activations on calibration images (their minimum and maximum).  The result
is a standard ONNX model that any runtime runs, with int8 arithmetic where the
CPU has it (VNNI, AMX).

The calibration images are CT slices prepared exactly as featurization prepares
them (lungsql.ml.preprocess, the CNN's own window, crop, size and
normalization): by default the synthetic chest CT of lungsql.dicom.synth, so that
a variant is the same file on every installation; `images` may be any other
slices (a site's own scans).

Some layers lose too much in 8 bits and stay in float32 (`Recipe.float_nodes`):
for EfficientNet-Lite, the first block after the stem, whose depthwise
convolution works at 112 x 112 on 32 channels.  On CT slices its features reach
a cosine similarity of 0.996 to float32 with it kept in float (0.988 with it
quantized), at about 15% of the int8 speed-up.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lungsql.errors import ConfigurationError
from lungsql.ml.preprocess import Preprocessing, prepare_volume

#: Bumped when the same inputs would give another file.
RECIPE_VERSION = 2
#: EfficientNet-Lite (lungsql.ml.cnn_export): the nodes of the first block keep float32.
LITE_FLOAT_NODES = ("/_blocks.0/",)


@dataclass(frozen=True)
class Recipe:
    """How an INT8 variant was made: stored with it in lungsql.cnn_models.source."""

    calibration_patients: int = 4
    calibration_slices: int = 60  # per synthetic patient
    seed: int = 20170  # of the synthetic calibration cohort
    calibration: str = "minmax"
    float_nodes: tuple[str, ...] = LITE_FLOAT_NODES  # node name prefixes left in float32
    format: str = "QDQ"
    activations: str = "uint8, per tensor"
    weights: str = "int8, per output channel"
    version: int = RECIPE_VERSION
    data: str = "lungsql.dicom.synth"  # where the calibration slices came from
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["float_nodes"] = list(self.float_nodes)
        return d

    def key(self, fp32_sha256: str) -> str:
        """What makes the file: the float model, this recipe and the quantizer's version."""
        import onnxruntime

        text = json.dumps({"from": fp32_sha256, "recipe": {k: v for k, v in self.to_json().items() if k != "extra"},
                           "onnxruntime": onnxruntime.__version__}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def synthetic_ct_images(preprocessing: Preprocessing, recipe: Recipe = Recipe()) -> np.ndarray:
    """The calibration images: `recipe.calibration_patients` synthetic chest CT series (half with
    nodules) of `recipe.calibration_slices` slices, each prepared as featurization prepares a series."""
    from lungsql.dicom import synth

    patients = synth.plan_cohort(recipe.calibration_patients, (recipe.calibration_slices,) * 2, seed=recipe.seed)
    volumes = []
    for patient in patients:
        stored = [synth.slice_pixels(patient, i) for i in range(patient.geometry.n_slices)]
        rescale = np.tile([synth.RESCALE_SLOPE, synth.RESCALE_INTERCEPT], (len(stored), 1))
        volumes.append(prepare_volume(stored, preprocessing, rescale))
    return np.concatenate(volumes)


class _Images:
    """onnxruntime.quantization's CalibrationDataReader over images in memory, a batch at a time."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int = 16) -> None:
        self.input_name, self.images, self.batch, self.at = input_name, images, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.at >= len(self.images):
            return None
        batch = self.images[self.at:self.at + self.batch]
        self.at += self.batch
        return {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    def rewind(self) -> None:
        self.at = 0


def quantize(onnx_bytes: bytes, input_name: str, images: np.ndarray, recipe: Recipe = Recipe()) -> bytes:
    """The INT8 (QDQ) variant of a float32 ONNX CNN, its activation ranges calibrated on `images`
    (N, C, S, S) float32 as the CNN takes them."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from lungsql.ml.cnn_export import drop_unused_opsets

    if images.ndim != 4 or len(images) == 0:
        raise ConfigurationError(f"calibration needs (N, C, S, S) images, got shape {list(images.shape)}")
    if recipe.calibration != "minmax":
        raise ConfigurationError(f"unknown calibration {recipe.calibration!r}", hint="minmax")
    model = onnx.load_from_string(bytes(onnx_bytes))
    excluded = [n.name for n in model.graph.node if any(n.name.startswith(p) for p in recipe.float_nodes)]
    with tempfile.TemporaryDirectory(prefix="lungsql-quantize-") as tmp:
        source, prepared, out = Path(tmp, "fp32.onnx"), Path(tmp, "prepared.onnx"), Path(tmp, "int8.onnx")
        source.write_bytes(bytes(onnx_bytes))
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        reader = _Images(input_name, images)
        quantize_static(str(prepared), str(out), reader, quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv", "Clip", "Add"],
                        nodes_to_exclude=excluded)
        quantized = onnx.load(str(out))
    # Only the opsets its nodes use (the quantizer lists every domain it knows), stamped like the float
    # export, and serialized deterministically: the same inputs, the same bytes.
    drop_unused_opsets(quantized)
    quantized.producer_name = "lungsql.ml.quantize"
    quantized.producer_version = str(RECIPE_VERSION)
    del quantized.metadata_props[:]
    for key, value in sorted({"recipe": json.dumps(recipe.to_json(), sort_keys=True),
                              "from_sha256": hashlib.sha256(bytes(onnx_bytes)).hexdigest()}.items()):
        quantized.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(quantized)
    return quantized.SerializeToString(deterministic=True)


def feature_agreement(float_features: np.ndarray, variant_features: np.ndarray) -> dict[str, float]:
    """How close a variant's features are to float32's on the same images: the cosine similarity
    of each image's feature vector (mean and minimum) and the largest relative difference of norms."""
    a = np.asarray(float_features, np.float64)
    b = np.asarray(variant_features, np.float64)
    if a.shape != b.shape or a.ndim != 2 or len(a) == 0:
        raise ValueError(f"features of different shapes: {a.shape} and {b.shape}")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cosine = np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-30)
    return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "norm_ratio_max_error": float(np.max(np.abs(nb / np.maximum(na, 1e-30) - 1.0))), "images": len(a)}
