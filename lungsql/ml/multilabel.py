"""Multi-label classification of images: one LightGBM booster per finding, stored as one model.

Images are split by patient, never by image: with the official lists (ChestX-ray14's
train_val_list.txt and test_list.txt) the test list is the validation part; otherwise a quarter of
the patients, stratified finding by finding and chosen by SHA-256 of the seed and the patient id
(lungsql.ml.training's rule), so that even a rare finding has validation images. Early
stopping uses a further part of the training patients, so the validation images take no part in
training. Each finding has its own class weighting (negatives / positives among its training
images), and its own metrics: AUC, positives and negatives on the validation images.

The stored form is data: each booster's LightGBM text and SHA-256, and a manifest (JSON) naming the
findings and their boosters' SHA-256, whose own SHA-256 is the model's.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from lungsql.errors import ConfigurationError, IntegrityError
from lungsql.ml import metrics as measures
from lungsql.ml import training

#: Share of the patients held out for validation when no official split was loaded.
VALID_FRACTION = 0.25
#: Share of the training patients kept aside for early stopping.
EARLY_STOP_FRACTION = 0.15
#: A finding is trained only with at least this many positive images in the training part.
MIN_POSITIVES = 2
#: Early stopping only with at least this many positive images among the stopping ones; else
#: FIXED_ROUNDS rounds on every training image (on synthetic cohorts of 60 to 100 patients, a fixed
#: 200 rounds gave a mean validation AUC 0.00 to 0.04 above early stopping on 15% of the patients).
MIN_STOP_POSITIVES = 10
FIXED_ROUNDS = 200
#: Below this many training images LightGBM runs on one thread (unless the params say otherwise):
#: OpenMP's threads cost more than they bring on small data, 20x more on a busy 2-core machine
#: (100 rounds on 300 images of 1280 features: 0.33 s on 1 thread, 6.6 s on the default).
ONE_THREAD_BELOW = 20_000


@dataclass
class Booster:
    finding: str
    model_text: str
    sha256: str
    best_iteration: int


@dataclass
class FindingsResult:
    boosters: list[Booster]
    metrics: dict[str, Any]  # per_finding, mean_auc, auc (the mean), log_loss (mean), counts, split
    params: dict[str, Any]
    feature_names: list[str]
    manifest: str = ""
    sha256: str = ""
    skipped: dict[str, str] = field(default_factory=dict)  # finding -> why it has no booster


def manifest(boosters: Sequence[Booster], findings: Sequence[str]) -> tuple[str, str]:
    """The model's manifest (JSON text) and its SHA-256."""
    text = json.dumps({"format": "lungsql-multilabel-1", "findings": list(findings),
                       "boosters": {b.finding: b.sha256 for b in boosters}}, sort_keys=True)
    return text, hashlib.sha256(text.encode()).hexdigest()


def patient_split(patients: Sequence[str], fraction: float, seed: int, Y: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask over images: True for the images of the held-out `fraction` of the patients.

    With labels `Y` (images x findings), the split is stratified: finding by finding, the rarest
    first, about `fraction` of the patients with that finding (at least one when two have it) are
    held out, then patients without one fill the held-out part up to `fraction`. Which patients is
    decided by SHA-256 of the seed and the patient id, so the split depends only on the data."""
    order = sorted(set(patients), key=lambda p: training._split_key(seed, p))
    target = min(max(1, int(math.floor(len(order) * fraction + 0.5))), max(len(order) - 1, 1))
    held: set[str] = set()
    findings_of: dict[str, set[int]] = {p: set() for p in order}
    if Y is not None and len(Y):
        for patient, row in zip(patients, np.asarray(Y).astype(bool)):
            findings_of[patient].update(int(j) for j in np.flatnonzero(row))
    having: dict[int, int] = {}  # finding -> patients with it
    for found in findings_of.values():
        for j in found:
            having[j] = having.get(j, 0) + 1
    wants: dict[int, int] = {}  # finding -> held-out patients it should have, once its turn came
    count = dict.fromkeys(having, 0)  # finding -> held-out patients with it

    def hold(patient: str) -> None:
        held.add(patient)
        for k in findings_of[patient]:
            count[k] += 1

    def room(patient: str, current: int | None) -> bool:  # every finding already served stays in its share
        return all(count[k] < wants[k] for k in findings_of[patient] if k in wants and k != current)

    for j in sorted(having, key=lambda j: (having[j], j)):
        if having[j] < 2:
            continue
        wants[j] = min(max(1, int(math.floor(having[j] * fraction + 0.5))), having[j] - 1)
        for patient in order:
            if count[j] >= wants[j] or len(held) >= target:
                break
            if j in findings_of[patient] and patient not in held and room(patient, j):
                hold(patient)
    for strict in (True, False):  # first the patients who add to no finding already served
        for patient in order:
            if len(held) >= target:
                break
            if patient not in held and (not strict or room(patient, None)):
                hold(patient)
    return np.array([p in held for p in patients], dtype=bool)


def train(X: np.ndarray, Y: np.ndarray, patients: Sequence[str], findings: Sequence[str],
          feature_names: Sequence[str], params: dict[str, Any] | None = None,
          official_split: Sequence[str | None] | None = None, seed: int = 2017,
          progress: Callable[[str], None] | None = None) -> FindingsResult:
    """One booster per finding on image vectors X (n, d) with 0/1 labels Y (n, len(findings)).

    `patients` names each image's patient; `official_split` gives each image's list ('train_val',
    'test' or None), used when every image is on one."""
    started = time.perf_counter()
    say = progress or (lambda line: None)
    X = np.asarray(X, np.float32)
    Y = np.asarray(Y)
    patients = [str(p) for p in patients]
    if X.ndim != 2 or X.shape[0] != len(patients) or Y.shape != (len(patients), len(findings)):
        raise ConfigurationError(f"{len(patients)} images, features of shape {X.shape} and labels of shape "
                                 f"{Y.shape}: they do not match the {len(findings)} findings")
    if len(set(patients)) < 4:
        raise ConfigurationError(f"training needs images of at least 4 patients; got {len(set(patients))}",
                                 hint="load and featurize more radiographs")
    if official_split is not None and all(s in ("train_val", "test") for s in official_split) \
            and {"train_val", "test"} <= set(official_split):
        valid = np.array([s == "test" for s in official_split], dtype=bool)
        leaked = {p for p, v in zip(patients, valid) if v} & {p for p, v in zip(patients, valid) if not v}
        if leaked:
            raise ConfigurationError(f"{len(leaked)} patients have images on both official lists, e.g. "
                                     f"{sorted(leaked)[:3]}", hint="check train_val_list.txt and test_list.txt")
        split = "official"
    else:
        valid = patient_split(patients, VALID_FRACTION, seed, Y)
        split = "patient"
    train_idx = np.flatnonzero(~valid)
    stop = patient_split([patients[i] for i in train_idx], EARLY_STOP_FRACTION, seed + 1, Y[train_idx])
    fit_idx, stop_idx, valid_idx = train_idx[~stop], train_idx[stop], np.flatnonzero(valid)
    say(f"training {len(findings)} findings on {fit_idx.size} images (early stopping on {stop_idx.size}), "
        f"validating on {valid_idx.size} images of {len({patients[i] for i in valid_idx})} patients "
        f"({'the official test list' if split == 'official' else 'a patient-wise split'})")
    lgb = training.lightgbm_module()
    names = [str(n) for n in feature_names]
    boosters, per_finding, skipped, effective = [], {}, {}, {}
    for j, finding in enumerate(findings):
        y = Y[:, j].astype(np.int64)
        counts = {"train_positives": int(y[train_idx].sum()), "train_negatives": int(train_idx.size - y[train_idx].sum()),
                  "positives": int(y[valid_idx].sum()), "negatives": int(valid_idx.size - y[valid_idx].sum())}
        user = training._canonical_user_params(params)
        # Early stopping needs enough positives to stop on; with fewer, a stop chosen on two or three
        # images is noise: then every training image trains, for a fixed number of rounds.
        stopping = int(y[stop_idx].sum()) >= MIN_STOP_POSITIVES and (
            "num_iterations" not in user or "early_stopping_round" in user)
        fit = fit_idx if stopping else train_idx
        positives = int(y[fit].sum())
        if positives < MIN_POSITIVES or positives == fit.size:
            skipped[finding] = f"{positives} positive of {fit.size} training images"
            per_finding[finding] = {**counts, "auc": None, "skipped": skipped[finding]}
            continue
        effective = training.effective_params(params, seed=seed, scale_pos_weight=(fit.size - positives) / positives)
        if not stopping:
            effective["early_stopping_round"] = 0
            if "num_iterations" not in user:
                effective["num_iterations"] = FIXED_ROUNDS
        if fit.size < ONE_THREAD_BELOW and "num_threads" not in user:
            effective["num_threads"] = 1
        sets = lgb.Dataset(X[fit], label=y[fit], feature_name=names, params=effective, free_raw_data=True)
        valid_sets = ([lgb.Dataset(X[stop_idx], label=y[stop_idx], reference=sets)]
                      if stopping and stop_idx.size else [])
        try:
            booster = lgb.train(effective, sets, valid_sets=valid_sets, valid_names=["stop"] * len(valid_sets))
        except (lgb.basic.LightGBMError, ValueError, TypeError) as exc:
            raise training._lightgbm_error(exc, training._canonical_user_params(params)) from exc
        best = int(booster.best_iteration) or booster.current_iteration()
        text = booster.model_to_string(num_iteration=best)
        stored = lgb.Booster(model_str=text)  # measured as it will be scored: parsed back from its text
        p = stored.predict(X[valid_idx]) if valid_idx.size else np.array([])
        y_valid = y[valid_idx]
        if 0 < y_valid.sum() < y_valid.size:
            auc, loss = measures.roc_auc(y_valid, p), measures.log_loss(y_valid, p)
        else:
            auc = loss = None
        per_finding[finding] = {**counts, "auc": auc, "log_loss": loss, "best_iteration": best}
        boosters.append(Booster(finding, text, hashlib.sha256(text.encode()).hexdigest(), best))
        say(f"{finding}: validation AUC {auc:.3f} ({counts['positives']} positive, {counts['negatives']} negative "
            f"images), {best} trees" if auc is not None else
            f"{finding}: {best} trees; no AUC ({counts['positives']} positive validation images)")
    if not boosters:
        raise ConfigurationError("no finding has enough positive training images to train on",
                                 hint=f"each finding needs at least {MIN_POSITIVES} positive images")
    aucs = [m["auc"] for m in per_finding.values() if m.get("auc") is not None]
    losses = [m["log_loss"] for m in per_finding.values() if m.get("log_loss") is not None]
    mean_auc = float(np.mean(aucs)) if aucs else None
    summary = {
        "per_finding": per_finding,
        "mean_auc": mean_auc,
        "auc": mean_auc,  # what the model comparison and the registry read
        "log_loss": float(np.mean(losses)) if losses else float("inf"),
        "findings_with_auc": len(aucs),
        "train_images": int(train_idx.size), "valid_images": int(valid_idx.size),
        "train_patients": len({patients[i] for i in train_idx}),
        "valid_patients": len({patients[i] for i in valid_idx}),
        "split": split,
        "seconds": round(time.perf_counter() - started, 3),
    }
    say(f"mean validation AUC {mean_auc:.3f} over {len(aucs)} findings ({summary['seconds']:.1f} s)"
        if mean_auc is not None else "no finding had validation images of both kinds: no AUC")
    text, digest = manifest(boosters, findings)
    return FindingsResult(boosters, summary, effective, names, text, digest, skipped)


class FindingsModel:
    """A stored multi-label model, its boosters checked against their SHA-256 and the manifest's."""

    def __init__(self, manifest_text: str, sha256: str, boosters: Mapping[str, tuple[str, str]],
                 model_id: int | None = None):
        from lungsql.ml import scoring

        if hashlib.sha256(manifest_text.encode()).hexdigest() != sha256:
            raise IntegrityError(f"model {model_id}: its manifest does not match its SHA-256: the stored model "
                                 "was altered; nothing was scored", hint="train the model again")
        try:
            spec = json.loads(manifest_text)
            self.findings = [str(f) for f in spec["findings"]]
            expected = {str(k): str(v) for k, v in spec["boosters"].items()}
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(f"model {model_id} is not a multi-label model (its manifest cannot be read)",
                                 hint="deploy a model trained by lungsql.train_findings") from None
        if set(expected) != set(boosters):
            raise IntegrityError(f"model {model_id}: its stored boosters ({', '.join(sorted(boosters))}) are not "
                                 f"those its manifest names ({', '.join(sorted(expected))})",
                                 hint="train the model again")
        self.model_id = model_id
        for finding, (text, digest) in boosters.items():
            if digest != expected[finding]:
                raise IntegrityError(f"model {model_id}: the booster of {finding} is not the one its manifest names",
                                     hint="train the model again")
        _check_all(boosters, model_id)
        self.boosters = {finding: scoring.load_model(text, digest, model_id)
                         for finding, (text, digest) in boosters.items()}

    def predict(self, vectors: np.ndarray) -> list[dict[str, float | None]]:
        """One {finding: probability} per row of `vectors`; None for a finding without a booster."""
        vectors = np.atleast_2d(np.asarray(vectors, np.float32))
        columns = {f: self.boosters[f].predict(vectors) for f in self.findings if f in self.boosters}
        return [{f: (float(columns[f][i]) if f in columns else None) for f in self.findings}
                for i in range(vectors.shape[0])]


def _check_all(boosters: Mapping[str, tuple[str, str]], model_id: int | None) -> None:
    """lungsql.ml.model_check's child-process check of every booster whose bytes match their SHA-256,
    in one child (one after another, 14 boosters took 3.7 s); `scoring.load_model` then finds them
    checked. A booster whose bytes do not match is left to load_model, which says so."""
    from lungsql.ml import model_check

    model_check.check_many([(text.encode("utf-8"), digest, f"the booster of {finding} of model {model_id}")
                            for finding, (text, digest) in boosters.items()
                            if isinstance(text, str) and hashlib.sha256(text.encode("utf-8")).hexdigest() == digest])
