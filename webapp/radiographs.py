"""The radiograph page: one chest radiograph through a window, the probability of each of its 14
findings, and a finding's heat map over it.

Everything comes from the database (040_radiographs.sql): the pixels from
``lungsql.radiograph_image``, the probabilities from ``lungsql.predict_findings``
(which records them), the heat maps from ``lungsql.radiograph_heatmap``. The
probabilities read in the colour bands of the lung-cancer probability
(lungsql.webapp.scoring.BANDS). Query parameters are checked here, before any
of them reaches the database: a bad one is a 400 saying what is expected.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

import sqlalchemy as sa
from flask import Blueprint, abort, current_app, render_template, request

from lungsql.webapp import audit, records
from lungsql.webapp.db import get_db, refusal, transaction
from lungsql.webapp.patients import cached_png
from lungsql.webapp.scoring import BANDS, ScoringUnavailable, band_of
from lungsql.webapp.slices import encode_heatmap_png, encode_png

bp = Blueprint("radiographs", __name__, url_prefix="/radiographs")

# The findings of the task chest_xray14, as lungsql.findings lists them (the web app's role cannot read
# that table; a test checks that they agree).
FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
            "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax")
# The deployment lungsql.predict_findings and radiograph_heatmap use when given no model name.
MODEL_NAME = "chest_xray14"
# The window's bounds in display units (0 black .. 255 white), as the controls offer them.
LEVEL_RANGE, WIDTH_RANGE = (0, 255), (1, 255)
DEFAULT_WINDOW = (128, 255)  # what the controls show for the whole range
# Whole numbers in ASCII digits only: int() would also take '１２', ' 12', '+12' and '1_2'.
_WHOLE = re.compile(r"[0-9]{1,3}")

#: The audit action of this page.
VIEW_ACTION = "view_radiograph"

_FINDINGS = sa.text("SELECT finding, probability, model_id FROM lungsql.predict_findings(CAST(:image_id AS bigint))")
# The model that answered, and its latest deployment under the name.
_ANSWERED = sa.text(
    "SELECT m.model_id, m.name, m.version, m.trained_at, m.metrics, d.strategy, d.deployed_at "
    "FROM lungsql.models m JOIN lungsql.deployments d USING (model_id) "
    "WHERE m.model_id = :model_id AND d.name = :name ORDER BY d.deployment_id DESC LIMIT 1")


@dataclass(frozen=True)
class Finding:
    name: str
    probability: float | None  # None: the model has no booster for it (too few positive training images)
    auc: float | None = None   # its booster's validation AUC, when measured

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")

    @property
    def percent(self) -> float | None:
        return None if self.probability is None else round(self.probability * 100.0, 1)

    @property
    def band(self) -> str | None:
        return None if self.percent is None else band_of(self.percent)[0]

    @property
    def band_wording(self) -> str | None:
        return None if self.percent is None else band_of(self.percent)[2]


@dataclass(frozen=True)
class RadiographModel:
    model_id: int
    name: str
    version: int
    trained_at: dt.datetime
    auc: float | None  # the mean validation AUC over the findings
    strategy: str
    deployed_at: dt.datetime


@dataclass(frozen=True)
class FindingsScore:
    image_id: int
    findings: list[Finding]  # every finding: the most probable first, those without a probability last
    model: RadiographModel | None

    @property
    def scored(self) -> list[Finding]:
        return [f for f in self.findings if f.probability is not None]


def predict(image_id: int) -> FindingsScore:
    """The probability of each finding on one (existing) radiograph, from the deployed model;
    ScoringUnavailable when there is none (no model deployed, an image that cannot be read...).
    Called in a transaction (webapp.db.transaction), the rows lungsql.finding_predictions gets commit
    with the page's audit row, which shows them."""
    conn = get_db()
    try:
        rows = conn.execute(_FINDINGS, {"image_id": image_id}).all()
    except sa.exc.DBAPIError as exc:  # a lost database raises on: an error page, not a message
        raise ScoringUnavailable(*refusal(exc, f"scoring radiograph {image_id}")) from None
    model = (conn.execute(_ANSWERED, {"model_id": rows[0].model_id, "name": MODEL_NAME}).mappings().first()
             if rows else None)
    metrics = (model or {}).get("metrics") or {}
    per_finding = metrics.get("per_finding") or {}
    probabilities = {r.finding: float(r.probability) for r in rows}
    findings = [Finding(name, probabilities.get(name), (per_finding.get(name) or {}).get("auc"))
                for name in FINDINGS]
    findings.sort(key=lambda f: (f.probability is None, -(f.probability or 0.0), FINDINGS.index(f.name)))
    deployed = None if model is None else RadiographModel(
        model_id=model["model_id"], name=model["name"], version=model["version"], trained_at=model["trained_at"],
        auc=metrics.get("auc"), strategy=model["strategy"], deployed_at=model["deployed_at"])
    return FindingsScore(image_id, findings, deployed)


@bp.get("/<int:image_id>")
def radiograph(image_id: int):
    """The radiograph page (?level=&width=: open it through that window); 404 for an unknown image."""
    image = _found(image_id)
    level, width = _window()
    detail = {"via": "web", "image_id": image_id, "image_index": image["image_index"]}
    try:
        with transaction():  # the probabilities recorded and the audit row that shows them, together
            result, failure = predict(image_id), None
            audit.record(VIEW_ACTION, patient_id=image["patient_id"], detail={
                **detail, "model_id": result.model.model_id if result.model else None,
                "probabilities": {f.name: f.probability for f in result.scored}})
    except ScoringUnavailable as exc:
        result, failure = None, exc
        audit.record(VIEW_ACTION, patient_id=image["patient_id"], detail={**detail, "error": failure.message})
    max_side = current_app.config["RADIOGRAPH_MAX_SIDE"]
    return render_template("radiograph.html", image=image, score=result, failure=failure,
                           level=level, width=width, default_window=DEFAULT_WINDOW, bands=BANDS,
                           shown=_shown_size(image, max_side))


@bp.get("/<int:image_id>/image.png")
def image_png(image_id: int):
    """The radiograph as PNG through the window ?level=&width= (both or neither: neither is the
    whole range), at most RADIOGRAPH_MAX_SIDE pixels on its longer side."""
    image = _found(image_id)
    level, width = _window()
    return _rendered(image, level, width, current_app.config["RADIOGRAPH_MAX_SIDE"])


@bp.get("/<int:image_id>/thumbnail.png")
def thumbnail_png(image_id: int):
    """The whole range, at most RADIOGRAPH_THUMBNAIL_SIDE pixels on its longer side (the patient page)."""
    return _rendered(_found(image_id), None, None, current_app.config["RADIOGRAPH_THUMBNAIL_SIDE"])


@bp.get("/<int:image_id>/heatmap.png")
def heatmap_png(image_id: int):
    """The heat map of ?finding= (default: the most probable) over the radiograph, a transparent PNG
    of the image's size as image.png shows it; 404 when there is none (no model deployed, or no
    booster for that finding)."""
    image = _found(image_id)
    finding = request.args.get("finding") or None
    if finding is not None and finding not in FINDINGS:
        abort(400, description=f"The finding must be one of {', '.join(FINDINGS)}.")
    found = records.radiograph_heatmap(image_id, finding)
    if found is None:
        abort(404, description="There is no heat map for this radiograph and finding.")
    return cached_png(f"radiograph-heat-{image['sha256']}-{found['model_id']}-{found['finding']}",
                      lambda: encode_heatmap_png(found["rows"], found["columns"], bytes(found["heat"])))


def _found(image_id: int) -> dict:
    image = records.radiograph(image_id)
    if image is None:
        abort(404, description="There is no radiograph with this ID.")
    return image


def _window() -> tuple[int | None, int | None]:
    """(level, width) of the query, both None for the whole range; 400 for anything else."""
    level = _whole("level", "The window level", LEVEL_RANGE)
    width = _whole("width", "The window width", WIDTH_RANGE)
    if (level is None) != (width is None):
        abort(400, description="Give the window's level and width together, or neither for the whole range.")
    return level, width


def _whole(name: str, what: str, bounds: tuple[int, int]) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":  # a blank field is no value
        return None
    if not _WHOLE.fullmatch(raw) or not bounds[0] <= int(raw) <= bounds[1]:
        abort(400, description=f"{what} must be a whole number from {bounds[0]} to {bounds[1]}.")
    return int(raw)


def _rendered(image: dict, level: int | None, width: int | None, max_side: int):
    window = "full" if level is None else f"{level}:{width}"

    def render() -> bytes:
        pixels = records.radiograph_pixels(image["image_id"], level, width, max_side)
        if pixels is None:  # deleted since it was looked up
            abort(404, description="There is no radiograph with this ID.")
        return encode_png(*pixels)

    return cached_png(f"radiograph-{image['sha256']}-{window}-{max_side}", render)  # a new window is a new image


def _shown_size(image: dict, max_side: int) -> tuple[int, int]:
    """(width, height) of the image as image.png gives it: no side above `max_side`."""
    rows, columns = int(image["rows"]), int(image["columns"])
    scale = min(1.0, max_side / max(rows, columns))
    return max(1, round(columns * scale)), max(1, round(rows * scale))


@bp.app_template_filter("thumbnail_size")
def thumbnail_size(image: dict) -> tuple[int, int]:
    """(width, height) of a radiograph's thumbnail, for the patient page's <img>."""
    return _shown_size(image, current_app.config["RADIOGRAPH_THUMBNAIL_SIDE"])
