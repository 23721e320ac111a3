"""Tests of the preprocessing recipe: CT slices in HU -> normalised CNN input (no database)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lungsql.dicom import synth
from lungsql.dicom.series import order_slices
from lungsql.errors import ConfigurationError, LungSQLError
from lungsql.ml.preprocess import (
    Preprocessing,
    Resampler,
    SquareCrop,
    body_crop,
    crop_resize,
    normalize,
    pack_groups,
    prepare_volume,
    window,
)


def _disc_volume(n: int, rows: int, cols: int, radii: list[float], center=None) -> np.ndarray:
    """Air (-1000 HU) with a soft-tissue disc (40 HU) of radius radii[i] in slice i."""
    cy, cx = center if center is not None else ((rows - 1) / 2, (cols - 1) / 2)
    r, c = np.ogrid[:rows, :cols]
    vol = np.full((n, rows, cols), -1000.0, np.float32)
    for i in range(n):
        vol[i][(r - cy) ** 2 + (c - cx) ** 2 <= radii[i] ** 2] = 40.0
    return vol


def _reference(vol: np.ndarray, p: Preprocessing) -> np.ndarray:
    """The recipe step by step, as the module docstring describes it."""
    crop = body_crop(vol, p.body_threshold_hu, p.body_margin)
    images = crop_resize(window(vol, *p.hu_window), crop, p.image_size, fill=0.0)
    return normalize(pack_groups(images, p.slices_per_image), p.mean, p.std)


# ----------------------------------------------------------------------------- ordering


def test_slices_are_ordered_by_position_not_instance_number() -> None:
    patient = synth.plan_cohort(1, (9, 9), seed=5)[0]
    g = patient.geometry
    # Files arrive in InstanceNumber order, which synth shuffles against z.
    arrival = sorted(range(g.n_slices), key=lambda i: patient.instance_numbers[i])
    assert arrival != list(range(g.n_slices))
    z = [g.z(i) for i in arrival]
    ordered = [arrival[j] for j in order_slices(z)]
    assert ordered == list(range(g.n_slices))


def test_order_is_stable_for_equal_positions_and_handles_descending_z() -> None:
    assert order_slices([5.0, 1.0, 5.0, -2.5, 1.0]).tolist() == [3, 1, 4, 0, 2]
    assert order_slices([30.0, 20.0, 10.0]).tolist() == [2, 1, 0]


def test_order_rejects_missing_positions() -> None:
    with pytest.raises(LungSQLError, match="finite"):
        order_slices([1.0, float("nan")])


# ----------------------------------------------------------------------------- window


def test_window_maps_lung_window_onto_0_255_and_clips() -> None:
    hu = np.array([-3000.0, -1000.0, -300.0, 400.0, 2000.0], np.float32)
    out = window(hu, -1000.0, 400.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 127.5, 255.0, 255.0], atol=1e-4)
    assert window(hu, -1000.0, 400.0, dtype=np.uint8).tolist() == [0, 0, 128, 255, 255]


def test_window_does_not_scale_each_slice_by_its_maximum() -> None:
    dark = np.full((4, 4), -800.0, np.float32)
    bright = dark.copy()
    bright[0, 0] = 400.0
    # The same HU gives the same value whatever else the slice holds...
    assert window(dark)[2, 2] == window(bright)[2, 2]
    # ...and a dark slice stays dark (the original stretched every slice to its maximum).
    assert window(dark).max() < 40


# ----------------------------------------------------------------------------- crop and resize


def test_crop_is_one_square_for_the_whole_volume_and_contains_the_body() -> None:
    # The body grows from slice to slice and sits off-centre.
    vol = _disc_volume(5, 300, 300, [20, 40, 60, 80, 100], center=(160, 140))
    crop = body_crop(vol)
    assert isinstance(crop, SquareCrop)
    body_rows, body_cols = np.nonzero((vol > -500).any(axis=0))
    assert crop.top <= body_rows.min() and body_rows.max() < crop.top + crop.side
    assert crop.left <= body_cols.min() and body_cols.max() < crop.left + crop.side
    assert 201 <= crop.side <= 201 * 1.1  # the widest disc, plus a small margin

    # prepare_volume uses that one crop for every slice: the small disc of slice 0
    # stays small, as it would not with a crop of its own.
    p = Preprocessing(image_size=64, body_margin=0.0)
    out = prepare_volume(vol, p)
    np.testing.assert_allclose(out, _reference(vol, p), atol=1e-5)
    tissue = (out[0] > 0).sum(axis=(1, 2))  # per channel = slices 0, 1, 2
    assert tissue[0] < tissue[1] < tissue[2]
    assert tissue[0] == pytest.approx(math.pi * (20 * 64 / 201) ** 2, rel=0.25)


def test_crop_ignores_isolated_noise_in_the_air_and_falls_back_to_the_full_image() -> None:
    vol = _disc_volume(3, 200, 200, [30, 30, 30])
    clean = body_crop(vol)
    vol[1, 2, 3] = 500.0  # one hot pixel far from the body
    assert body_crop(vol) == clean
    empty = np.full((2, 120, 90), -1000.0, np.float32)  # no body at all
    assert body_crop(empty) == SquareCrop(top=0, left=-15, side=120)


def test_crop_of_synthetic_patient_keeps_the_body() -> None:
    patient = synth.plan_cohort(1, (4, 4), seed=11)[0]
    vol = np.stack([synth.slice_hu(patient, i) for i in range(4)])
    crop = body_crop(vol)
    rows, cols = np.nonzero((vol > -500).any(axis=0))
    assert crop.top <= rows.min() and rows.max() < crop.top + crop.side
    assert crop.left <= cols.min() and cols.max() < crop.left + crop.side
    assert crop.side < 512  # the padding outside the scanner's field of view is cut away


@pytest.mark.parametrize("shape", [(128, 128), (512, 512), (100, 160), (160, 100), (600, 600)])
def test_any_slice_size_gives_the_cnn_size(shape: tuple[int, int]) -> None:
    rows, cols = shape
    vol = _disc_volume(4, rows, cols, [min(rows, cols) * 0.45] * 4)
    vol += np.random.default_rng(0).normal(0, 20, vol.shape).astype(np.float32)
    p = Preprocessing(image_size=224)
    out = prepare_volume(list(vol), p)
    assert out.shape == (2, 3, 224, 224) and out.dtype == np.float32
    assert out.flags.c_contiguous
    np.testing.assert_allclose(out, _reference(vol, p), atol=1e-4)


def test_square_reaching_outside_a_narrow_image_is_filled_with_air() -> None:
    vol = np.full((1, 40, 100), 40.0, np.float32)  # body fills a wide, short image
    crop = body_crop(vol, margin=0.0)
    assert crop == SquareCrop(top=-30, left=0, side=100)
    out = crop_resize(window(vol), crop, 50)[0]
    assert np.all(out[:10] == 0.0) and np.all(out[-10:] == 0.0)  # air above and below
    np.testing.assert_allclose(out[20:30], window(np.float32(40.0)), atol=1e-4)


@pytest.mark.parametrize("side", [448, 460, 461, 350, 300, 224, 180, 700])
def test_box_resampling_is_block_means_and_a_mild_bilinear_step(side: int) -> None:
    import cv2

    square = np.random.default_rng(side).normal(0, 100, (side, side)).astype(np.float32)
    linear = cv2.INTER_LINEAR

    def blocks(image: np.ndarray, k: int) -> np.ndarray:  # the mean of each k x k block
        n = image.shape[0] // k
        return image.reshape(n, k, n, k).mean(axis=(1, 3))

    if side <= 1.5 * 224:
        expected = cv2.resize(square, (224, 224), interpolation=linear)
    elif side < 2 * 224:
        expected = blocks(cv2.resize(square, (448, 448), interpolation=linear), 2)
    else:
        k = side // 224
        kept = side // k * k
        first = (side - kept) // 2
        reduced = blocks(square[first:first + kept, first:first + kept], k)
        assert 224 <= reduced.shape[0] < 1.5 * 224
        expected = cv2.resize(reduced, (224, 224), interpolation=linear)
    np.testing.assert_allclose(Resampler(side, 224, "box")(square), expected, atol=1e-3)


@pytest.mark.parametrize("side", [460, 300])
def test_box_and_area_resampling_agree_on_smooth_images(side: int) -> None:
    r, c = np.mgrid[:side, :side] / side
    square = (1000 * np.sin(3 * r) * np.cos(2 * c)).astype(np.float32)
    box, area = Resampler(side, 224, "box")(square), Resampler(side, 224, "area")(square)
    assert np.abs(box - area).max() < 0.01 * np.abs(area).max()


def test_stored_values_with_their_rescale_give_the_hu_result() -> None:
    hu = _disc_volume(5, 96, 80, [30, 32, 34, 36, 38])
    hu += np.random.default_rng(3).normal(0, 30, hu.shape).astype(np.float32)
    p = Preprocessing(image_size=32)
    # One scanner's files: stored = HU + 1024 in int16.  Another's: slope 0.5 and a per-slice intercept.
    same = np.rint(hu + 1024).astype(np.int16)
    np.testing.assert_allclose(prepare_volume(list(same), p, [(1.0, -1024.0)] * 5),
                               prepare_volume(list(same.astype(np.float32) - 1024), p), atol=1e-4)
    intercepts = [-1024.0, -1000.0, -1024.0, -990.0, -1024.0]
    stored = [np.rint((h - b) / 0.5).astype(np.int16) for h, b in zip(hu, intercepts)]
    expected = prepare_volume([s.astype(np.float32) * 0.5 + b for s, b in zip(stored, intercepts)], p)
    np.testing.assert_allclose(prepare_volume(stored, p, [(0.5, b) for b in intercepts]), expected, atol=1e-4)


def test_stored_slices_with_their_own_rescale_and_channel_means_give_the_step_by_step_numbers() -> None:
    # Every part of the fused computation at once: stored integers with a rescale of their own, a
    # square reaching outside the image, a mean and std per channel, and a last image completed
    # with copies of the last slice, each copy normalized as its own channel.
    rng = np.random.default_rng(11)
    hu = _disc_volume(7, 90, 120, [36, 38, 40, 42, 44, 46, 48])
    hu += rng.normal(0, 40, hu.shape).astype(np.float32)
    slopes = [1.0, 0.5, 1.0, 2.0, 1.0, 0.5, 1.0]
    intercepts = [-1024.0, -1000.0, -1024.0, -990.0, 0.0, -1024.0, -1024.0]
    stored = [np.rint((h - b) / a).astype(np.int16) for h, a, b in zip(hu, slopes, intercepts)]
    exact_hu = np.stack([s.astype(np.float32) * np.float32(a) + np.float32(b)
                         for s, a, b in zip(stored, slopes, intercepts)])
    p = Preprocessing(image_size=40, mean=(120.0, 127.5, 135.0), std=(60.0, 70.0, 80.0))
    out = prepare_volume(stored, p, list(zip(slopes, intercepts)))
    assert out.shape == (3, 3, 40, 40) and out.dtype == np.float32
    assert body_crop(exact_hu).side > 90  # the square reaches outside the 90 rows of the image
    np.testing.assert_allclose(out, _reference(exact_hu, p), atol=1e-4)
    # The last image is slice 6 three times, in each channel's units.
    np.testing.assert_allclose(out[2, 1] * 70.0 + 127.5, out[2, 0] * 60.0 + 120.0, atol=1e-3)
    np.testing.assert_allclose(out[2, 2] * 80.0 + 135.0, out[2, 0] * 60.0 + 120.0, atol=1e-3)


def test_air_outside_a_narrow_image_follows_each_slice_rescale() -> None:
    stored = [np.full((40, 100), v, np.int16) for v in (1064, 90)]  # 40 HU body in both slices
    out = prepare_volume(stored, Preprocessing(image_size=50, body_margin=0.0), [(1.0, -1024.0), (1.0, -50.0)])
    air = (0.0 - 127.5) / 127.5
    assert np.allclose(out[0, :2, :5], air, atol=1e-5)  # above the body, both slices: air
    np.testing.assert_allclose(out[0, :2, 25], (1040 / 1400 * 255 - 127.5) / 127.5, atol=1e-4)


def test_bad_rescale_is_refused() -> None:
    vol = [np.zeros((16, 16), np.int16)] * 2
    with pytest.raises(LungSQLError, match="slope"):
        prepare_volume(vol, Preprocessing(image_size=8), [(1.0, -1024.0), (0.0, -1024.0)])
    with pytest.raises(ValueError, match="one \\(slope, intercept\\) per slice"):
        prepare_volume(vol, Preprocessing(image_size=8), [(1.0, -1024.0)])


# ----------------------------------------------------------------------------- packing


def _numbered(n: int, size: int = 8) -> np.ndarray:
    return np.stack([np.full((size, size), i, np.float32) for i in range(n)])


def test_tail_is_kept_by_repeating_the_last_slice() -> None:
    groups = pack_groups(_numbered(7))
    assert groups.shape == (3, 3, 8, 8)
    assert groups[:, :, 0, 0].tolist() == [[0, 1, 2], [3, 4, 5], [6, 6, 6]]
    assert pack_groups(_numbered(8))[:, :, 0, 0].tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 7]]


def test_full_groups_and_single_slice() -> None:
    assert pack_groups(_numbered(9))[:, :, 0, 0].tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert pack_groups(_numbered(1))[:, :, 0, 0].tolist() == [[0, 0, 0]]


def test_prepare_volume_channels_are_consecutive_slices_in_order() -> None:
    # Slice i is uniform at -1000 + 100 i HU, so its windowed value tells which slice it is.
    n = 7
    hu = [np.full((64, 48), -1000.0 + 100.0 * i, np.float32) for i in range(n)]
    p = Preprocessing(image_size=16, mean=(0.0,) * 3, std=(1.0,) * 3)
    out = prepare_volume(hu, p)
    assert out.shape == (3, 3, 16, 16)
    slice_of = np.rint(out[:, :, 8, 8] / (100 * 255 / 1400)).astype(int)
    assert slice_of.tolist() == [[0, 1, 2], [3, 4, 5], [6, 6, 6]]


def test_empty_and_mixed_size_series_are_refused() -> None:
    with pytest.raises(LungSQLError, match="no slices"):
        prepare_volume([], Preprocessing())
    with pytest.raises(LungSQLError, match="differ in size"):
        prepare_volume([np.zeros((64, 64), np.float32), np.zeros((32, 64), np.float32)], Preprocessing())


# ----------------------------------------------------------------------------- normalisation


def test_normalize_uses_per_channel_mean_and_std() -> None:
    groups = np.stack([np.full((2, 2), v, np.float32) for v in (0.0, 127.5, 255.0)])[None]
    out = normalize(groups, (127.5, 127.5, 127.5), (127.5, 127.5, 127.5))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0, 0], [-1.0, 0.0, 1.0], atol=1e-6)
    out = normalize(groups, (0.0, 100.0, 255.0), (1.0, 2.0, 5.0))
    np.testing.assert_allclose(out[0, :, 0, 0], [0.0, 13.75, 0.0], atol=1e-5)


def test_prepare_volume_values_of_lung_window_ends() -> None:
    hu = [np.full((32, 32), v, np.float32) for v in (-1200.0, -300.0, 400.0)]
    out = prepare_volume(hu, Preprocessing(image_size=8))
    np.testing.assert_allclose(out[0, :, 4, 4], [-1.0, 0.0, 1.0], atol=1e-5)
    out = prepare_volume(hu, Preprocessing(image_size=8, mean=(127.0,) * 3, std=(128.0,) * 3))
    np.testing.assert_allclose(out[0, :, 4, 4], [-127 / 128, 0.5 / 128, 1.0], atol=1e-5)


def test_int16_input_gives_the_same_result() -> None:
    vol = _disc_volume(3, 64, 64, [20, 22, 24]).astype(np.int16)
    p = Preprocessing(image_size=32)
    np.testing.assert_allclose(prepare_volume(vol, p), prepare_volume(vol.astype(np.float32), p))


# ----------------------------------------------------------------------------- the recipe as data


def test_recipe_round_trips_through_json() -> None:
    p = Preprocessing(image_size=256, hu_window=(-1100, 300), mean=(127, 127, 127), std=(128, 128, 128))
    stored = json.loads(json.dumps(p.to_json()))
    assert stored["version"] == 1 and stored["mean"] == [127.0, 127.0, 127.0]
    assert Preprocessing.from_json(stored) == p
    assert stored["resampling"] == "box"


def test_recipes_stored_before_box_resampling_keep_area_averaging() -> None:
    # A recipe without the key was written when area averaging was the only resampling:
    # featurizing with it again must give the features its models were trained on.
    assert Preprocessing.from_json({"version": 1}) == Preprocessing(resampling="area")
    assert Preprocessing.from_json({"version": 1, "resampling": "box"}) == Preprocessing()


def test_recipe_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Preprocessing.from_settings() == Preprocessing()
    monkeypatch.setenv("LUNGSQL_IMAGE_SIZE", "256")
    monkeypatch.setenv("LUNGSQL_HU_WINDOW", "-1200:600")
    p = Preprocessing.from_settings(mean=(127.0,) * 3, std=(128.0,) * 3)
    assert (p.image_size, p.hu_window, p.mean, p.std) == (256, (-1200.0, 600.0), (127.0,) * 3, (128.0,) * 3)


@pytest.mark.parametrize("bad, match", [
    ({"image_size": 0}, "image_size"),
    ({"hu_window": (400, -1000)}, "LOW < HIGH"),
    ({"mean": (127.5, 127.5)}, "channels"),
    ({"std": (127.5, 0.0, 127.5)}, "positive"),
    ({"colour": "red"}, "unknown keys"),
    ({"version": 99}, "recipe version"),
    ({"resampling": "nearest"}, "resampling"),
])
def test_bad_recipes_say_what_is_wrong(bad: dict, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Preprocessing.from_json(bad)
