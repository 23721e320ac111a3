"""The chest radiograph task (lungsql.ml.tasks.CHEST_XRAY14) inside the database: featurize each
stored radiograph with a CNN, train one booster per finding, score an image's findings.

The same machinery as lung cancer on CT (lungsql.server.pipeline): the CNN comes from
lungsql.cnn_models through `pipeline.load_featurizer`, runs are recorded in lungsql.feature_runs
(task 'chest_xray14'; its patients and slices count images), an image that cannot be featurized is
recorded and skipped, the registry deploys the model with the lowest validation log loss (the mean
over the findings), and every probability returned is recorded.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from lungsql import registry
from lungsql.errors import ConfigurationError, LungSQLError
from lungsql.ml import multilabel, tasks
from lungsql.ml.preprocess import Preprocessing, prepare_radiographs
from lungsql.server import pipeline

TASK = tasks.CHEST_XRAY14
#: Radiographs per CNN batch, each batch committed at once.
IMAGES_PER_BATCH = 32
FEATURE_SET = "cnn-image-v1"


@dataclass
class ImageRun:
    run_id: int
    cnn: str
    provider: str
    images: int = 0
    failed: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        rate = self.images / self.seconds if self.seconds else 0.0
        return (f"featurized {self.images} radiographs with CNN {self.cnn!r} on {self.provider} in "
                f"{self.seconds:.1f} s ({rate:.0f} images/s)"
                + (f"; {self.failed} skipped (lungsql.image_feature_failures)" if self.failed else ""))


def generate_features(data, cnn_name: str | None = None, only_missing: bool = True, shard: int = 0,
                      shards: int = 1, retry_failed: bool = False,
                      featurizer_for: Callable[[dict[str, Any]], Any] | None = None) -> ImageRun:
    """CNN features of every stored radiograph of this shard, a batch committed at a time (by default
    on the server's cores shared among the `shards` sessions, as pipeline.generate_features)."""
    from lungsql.dicom.radiograph import decode_radiograph

    if shards < 1 or not 0 <= shard < shards:
        raise ConfigurationError(f"shard must be in 0..shards-1 and shards >= 1; got shard={shard}, shards={shards}")
    cnn = data.cnn_model(cnn_name)
    for run_id in data.mark_killed_runs():
        data.notice(f"featurization run {run_id} ended before it finished (its session is gone): marked killed")
    preprocessing = Preprocessing.from_json(pipeline.json_value(cnn["preprocessing"]))
    if featurizer_for is None:
        def featurizer_for(cnn: dict[str, Any]) -> Any:
            return pipeline.load_featurizer(cnn, threads=pipeline.shard_threads(shards))
    with featurizer_for(cnn) as featurizer:
        ids = [i for i in data.radiographs_to_featurize(cnn["cnn_id"], only_missing, retry_failed)
               if pipeline.in_shard(str(i), shard, shards)]
        run = ImageRun(data.start_feature_run(cnn["cnn_id"], featurizer.provider, shard, shards, task=TASK.name),
                       cnn["name"], featurizer.provider)
        data.commit()
        data.notice(f"featurizing {len(ids)} radiographs with CNN {cnn['name']!r} on {featurizer.provider} "
                    f"(shard {shard} of {shards})")
        started = time.perf_counter()

        batches = [ids[i:i + IMAGES_PER_BATCH] for i in range(0, len(ids), IMAGES_PER_BATCH)]
        # plpy is called from this thread only: it reads the files of the next batch, the pool's threads
        # decode and resize them (OpenCV lets go of the GIL), while the CNN runs on the batch before.
        workers = max(1, int(getattr(featurizer, "prepare_threads", 1)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lungsql-radiographs") as pool:
            pending: list = []
            for k in range(len(batches) + 1):
                files = data.radiograph_files(batches[k]) if k < len(batches) else []
                submitted = [pool.submit(_prepare_one, row, preprocessing, decode_radiograph) for row in files]
                if pending:
                    _write_batch(data, cnn, featurizer, run, [f.result() for f in pending])
                    run.seconds = time.perf_counter() - started
                    data.update_feature_run(run.run_id, run.images, run.images, run.seconds, {}, finished=False,
                                            failed=run.failed)
                    data.commit()  # this batch is done, whatever happens to the next
                    data.notice(f"{run.images + run.failed}/{len(ids)} radiographs, "
                                f"{run.images / run.seconds if run.seconds else 0:.0f} images/s"
                                + (f", {run.failed} skipped" if run.failed else ""))
                pending = submitted
        run.seconds = time.perf_counter() - started
        data.update_feature_run(run.run_id, run.images, run.images, run.seconds, {}, finished=True, failed=run.failed)
        data.commit()
    return run


def _prepare_one(row: dict, preprocessing: Preprocessing, decode) -> tuple[int, np.ndarray | None, str | None]:
    """(image_id, its CNN input, None), or (image_id, None, why it cannot be featurized)."""
    try:
        return int(row["image_id"]), prepare_radiographs([decode(bytes(row["data"]))], preprocessing)[0], None
    except Exception as exc:  # a stored file whatever it holds: recorded, and the run goes on
        return int(row["image_id"]), None, pipeline.failure_reason(exc)


def _write_batch(data, cnn: dict, featurizer, run: ImageRun, prepared: list[tuple]) -> None:
    for image_id, _, reason in prepared:
        if reason is not None:
            data.record_image_failure(image_id, cnn["cnn_id"], run.run_id, reason)
            data.notice(f"skipped radiograph {image_id}: {reason}")
            run.failed += 1
    kept = [(image_id, image) for image_id, image, reason in prepared if reason is None]
    if not kept:
        return
    vectors = featurizer.run(np.stack([image for _, image in kept]))
    for (image_id, _), vector in zip(kept, vectors):
        data.write_image_features(image_id, cnn["cnn_id"], vector, run.run_id)
    run.images += len(kept)


# ----------------------------------------------------------------------------- training


def train(data, model_name: str | None = None, params: dict | None = None,
          cnn_name: str | None = None) -> tuple[int, dict[str, Any]]:
    """One booster per finding on the labelled, featurized radiographs; returns (model id, metrics)."""
    model_name = (model_name or TASK.default_model_name).strip()
    if not model_name:
        raise ConfigurationError("model_name must not be empty", hint="e.g. model_name => 'chest_xray14'")
    cnn = data.cnn_model(cnn_name)
    rows = data.labelled_image_features(cnn["cnn_id"], TASK.name)
    if not rows:
        raise ConfigurationError(
            f"no labelled radiograph has features from CNN {cnn['name']!r}",
            hint="lungsql ingest --task chest_xray14 DIR (images and Data_Entry_2017.csv), then "
                 "CALL lungsql.generate_features(task => 'chest_xray14')")
    from lungsql.server.radiograph_data import image_vector

    X = np.stack([image_vector(r) for r in rows])
    Y = np.array([[f in set(r["findings"]) for f in TASK.findings] for r in rows], dtype=np.int64)
    data.notice(f"training {model_name!r} on {len(rows)} labelled radiographs of "
                f"{len({r['patient_id'] for r in rows})} patients (CNN {cnn['name']!r})")
    result = multilabel.train(X, Y, [r["patient_id"] for r in rows], TASK.findings, image_feature_names(X.shape[1]),
                              params, official_split=[r["split"] for r in rows], progress=data.notice)
    data.lock_model_name(model_name)
    existing = data.models(model_name)
    _check_task(model_name, existing)
    model_id = data.insert_model({
        "name": model_name, "version": max((m["version"] for m in existing), default=0) + 1,
        "cnn_id": cnn["cnn_id"], "feature_set": FEATURE_SET, "feature_names": result.feature_names,
        "params": result.params, "model_text": result.manifest, "sha256": result.sha256,
        "metrics": result.metrics, "task": TASK.name, "algorithm": "lightgbm-multilabel",
    })
    data.insert_boosters(model_id, result.boosters)
    strategy, notice = registry.after_training(model_name, {"model_id": model_id, "metrics": result.metrics},
                                               data.deployed(model_name, task=TASK.name))
    if strategy is not None:
        data.insert_deployment(model_name, model_id, strategy)
    data.notice(notice)
    return model_id, result.metrics


def image_feature_names(dim: int) -> list[str]:
    """The names of an image vector's values: the CNN's output, one per channel."""
    return [f"cnn_{i}" for i in range(dim)]


def _check_task(model_name: str, models: Sequence[dict]) -> None:
    other = {m.get("task") for m in models} - {TASK.name}
    if other:
        raise ConfigurationError(f"the name {model_name!r} belongs to models of the task {sorted(other)[0]!r}",
                                 hint=f"give the radiograph model its own name, e.g. {TASK.default_model_name!r}")


# ----------------------------------------------------------------------------- scoring

_models: dict[tuple[int, str], multilabel.FindingsModel] = {}


def deployed_model(data, model_name: str | None) -> tuple[dict[str, Any], multilabel.FindingsModel]:
    deployed = data.deployed(model_name or TASK.default_model_name, task=TASK.name)
    if deployed is None:
        raise ConfigurationError(f"no radiograph model is deployed as {model_name or TASK.default_model_name!r}",
                                 hint="train one: SELECT * FROM lungsql.train_findings()")
    key = (int(deployed["model_id"]), deployed["sha256"])
    if key not in _models:
        manifest, boosters = data.model_boosters(deployed["model_id"])
        _models.clear()
        _models[key] = multilabel.FindingsModel(manifest, deployed["sha256"], boosters, deployed["model_id"])
    return deployed, _models[key]


def warm_up(data, model_name: str | None = None) -> int | None:
    """Load and check the deployed radiograph model into this process, scoring nothing; its id, or None."""
    if data.deployed(model_name or TASK.default_model_name, task=TASK.name) is None:
        return None
    deployed, _ = deployed_model(data, model_name)
    return int(deployed["model_id"])


@dataclass
class Findings:
    model_id: int
    rows: list[tuple[int, str, float]]  # (image_id, finding, probability)


def predict(data, image_ids: Sequence[int], model_name: str | None = None,
            featurizer_for: Callable[[dict[str, Any]], Any] = pipeline.load_featurizer) -> Findings:
    """(image_id, finding, probability) for each radiograph that exists, the findings in the task's
    order, and the model that answered; recorded in lungsql.finding_predictions. A radiograph not
    featurized yet with the model's CNN is featurized first (and its features stored)."""
    deployed, model = deployed_model(data, model_name)
    ids = [int(i) for i in dict.fromkeys(image_ids)]
    vectors = data.image_vectors(ids, deployed["cnn_id"])
    missing = [i for i in ids if i not in vectors and i in data.existing_radiographs([i])]
    if missing:
        vectors.update(_featurize_now(data, deployed["cnn_id"], missing, featurizer_for))
    scored = [i for i in ids if i in vectors]
    rows = []
    if scored:
        for image_id, probabilities in zip(scored, model.predict(np.stack([vectors[i] for i in scored]))):
            rows += [(image_id, finding, p) for finding, p in probabilities.items() if p is not None]
        data.record_finding_predictions(deployed["model_id"], rows)
    return Findings(int(deployed["model_id"]), rows)


def _featurize_now(data, cnn_id: int, image_ids: list[int], featurizer_for) -> dict[int, np.ndarray]:
    from lungsql.dicom.radiograph import decode_radiograph

    cnn = data.cnn_by_id(cnn_id)
    preprocessing = Preprocessing.from_json(pipeline.json_value(cnn["preprocessing"]))
    prepared = [_prepare_one(row, preprocessing, decode_radiograph) for row in data.radiograph_files(image_ids)]
    failed = [(image_id, reason) for image_id, _, reason in prepared if reason is not None]
    if failed:
        raise LungSQLError(f"radiograph {failed[0][0]} cannot be read: {failed[0][1]}",
                           hint="upload the image again")
    kept = [image_id for image_id, _, _ in prepared]
    with featurizer_for(cnn) as featurizer:
        vectors = featurizer.run(np.stack([image for _, image, _ in prepared]))
    for image_id, vector in zip(kept, vectors):
        data.write_image_features(image_id, cnn_id, vector, None)
    return dict(zip(kept, vectors))


# ----------------------------------------------------------------------------- the radiograph page


def render(data, image_id: int, level: float | None = None, width: float | None = None,
           max_side: int = 1024) -> tuple[int, int, bytes] | None:
    """One stored radiograph as displayed, through a window (`level` and `width` in display units,
    0 black .. 255 white; None: the whole range), at most `max_side` pixels on its longer side:
    (rows, columns, uint8 bytes row by row), or None for an unknown image. Decoded here, in the
    server, under the decoding limits: the file never leaves it."""
    import cv2

    from lungsql.dicom.radiograph import decode_radiograph

    files = data.radiograph_files([int(image_id)])
    if not files:
        return None
    image = decode_radiograph(bytes(files[0]["data"])) * np.float32(255.0)
    level = 127.5 if level is None else float(level)
    width = 255.0 if width is None else float(width)
    if not width > 0:
        raise ConfigurationError(f"the window width must be above 0, not {width}", hint="e.g. level 128, width 255")
    low = level - width / 2
    shown = np.clip((image - np.float32(low)) * np.float32(255.0 / width), 0, 255)
    side = max(shown.shape)
    max_side = max(16, min(int(max_side), 4096))
    if side > max_side:
        scale = max_side / side
        shown = cv2.resize(shown, (max(1, round(shown.shape[1] * scale)), max(1, round(shown.shape[0] * scale))),
                           interpolation=cv2.INTER_AREA)
    out = np.ascontiguousarray((shown + 0.5).astype(np.uint8))
    return int(out.shape[0]), int(out.shape[1]), out.tobytes()


@dataclass
class FindingHeatmap:
    rows: int
    columns: int
    heat: bytes  # rows x columns uint8, 0 .. 255
    finding: str
    probability: float
    model_id: int
    method: str


def heatmap(data, image_id: int, finding: str | None = None, model_name: str | None = None,
            max_side: int = 1024) -> FindingHeatmap | None:
    """Where in the radiograph the features that raised `finding`'s probability (default: the most
    probable finding) were strongest: the CNN's last feature map weighted by the finding booster's
    TreeSHAP contributions (lungsql.ml.heatmap), scaled to the image as `render` shows it."""
    import cv2

    from lungsql.dicom.radiograph import decode_radiograph
    from lungsql.ml import explain, heatmap as maps

    deployed, model = deployed_model(data, model_name)
    files = data.radiograph_files([int(image_id)])
    if not files:
        return None
    vectors = data.image_vectors([int(image_id)], deployed["cnn_id"])
    if int(image_id) not in vectors:
        vectors.update(_featurize_now(data, deployed["cnn_id"], [int(image_id)], pipeline.load_featurizer))
    vector = vectors[int(image_id)]
    probabilities = model.predict(vector[np.newaxis, :])[0]
    if finding is None:
        finding = max((f for f in probabilities if probabilities[f] is not None), key=lambda f: probabilities[f])
    if finding not in model.boosters:
        raise ConfigurationError(f"the model has no booster for {finding!r}",
                                 hint=f"use one of: {', '.join(model.boosters)}")
    weights = explain.contributions(model.boosters[finding].booster, vector)[:-1]
    cnn = data.cnn_by_id(deployed["cnn_id"])
    p = Preprocessing.from_json(pipeline.json_value(cnn["preprocessing"]))
    image = decode_radiograph(bytes(files[0]["data"]))
    batch = prepare_radiographs([image], p)
    session = maps.feature_map_session(bytes(cnn["model"]), cnn["sha256"])
    output = ((pipeline.json_value(cnn["source"]) or {}).get("feature_map") or {}).get("output")
    if output:
        (feature_map,) = session.run([output], {cnn["input_name"]: batch})
        cam, method = maps.activation_map(feature_map[0], weights), "class activation"
    else:
        cam = maps.occlusion_map(session, cnn["input_name"], cnn["output_name"], batch, weights)
        method = "occlusion"
    rows, cols = image.shape
    scale = min(1.0, max(16, min(int(max_side), 4096)) / max(rows, cols))
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    heat = cv2.resize(cam.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    heat = np.clip(heat, 0, 1)
    return FindingHeatmap(size[1], size[0], (heat * 255 + 0.5).astype(np.uint8).tobytes(), finding,
                          float(probabilities[finding]), int(deployed["model_id"]), method)
