"""Administrators' pages: the models, their metrics and ROC curves, deployment.

Deploying calls ``lungsql.deploy(name, strategy)``, which runs with its
owner's rights; the web app's role cannot change the registry otherwise. The
audit log is not shown here: the web app's role cannot read it (the DBA
reads it with `lungsql audit`).
"""

from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for

from lungsql import registry  # the registry's rules; a light module, no ML code
from lungsql.webapp import audit
from lungsql.webapp.auth import admin_required
from lungsql.webapp.charts import roc_chart, roc_overlay
from lungsql.webapp.db import get_db, refusal, transaction
from lungsql.webapp.records import clean_query

bp = Blueprint("admin", __name__, url_prefix="/admin")
bp.before_request(admin_required)

STRATEGIES = registry.STRATEGIES
MODELS_SHOWN = 200


@bp.get("/")
def models():
    conn = get_db()
    rows = conn.execute(sa.text(
        "SELECT model_id, name, version, algorithm, task, trained_at, metrics FROM lungsql.models "
        "ORDER BY name, version DESC LIMIT :limit"), {"limit": MODELS_SHOWN}).mappings().all()
    current = {r["name"]: r for r in conn.execute(sa.text(
        "SELECT DISTINCT ON (d.name) d.name, d.model_id, d.strategy, d.deployed_at, d.deployment_id, m.task "
        "FROM lungsql.deployments d JOIN lungsql.models m USING (model_id) "
        "ORDER BY d.name, d.deployment_id DESC")).mappings()}
    history = conn.execute(sa.text(
        "SELECT d.deployment_id, d.name, d.model_id, m.version, d.strategy, d.deployed_at "
        "FROM lungsql.deployments d JOIN lungsql.models m ON m.model_id = d.model_id "
        "ORDER BY d.deployment_id DESC LIMIT 20")).mappings().all()
    # Patient pages score CT with the latest lung-cancer deployment (radiographs have their own name).
    default = max((r for r in current.values() if r["task"] == "lung_cancer"), key=lambda r: r["deployment_id"],
                  default=None)
    names: dict[str, list[dict]] = {}
    for row in rows:
        model = dict(row)
        model["chart"] = roc_chart(model["metrics"])
        model["deployed"] = current.get(row["name"], {}).get("model_id") == row["model_id"]
        names.setdefault(row["name"], []).append(model)
    return render_template("admin/models.html", names=names, current=current, default=default,
                           history=history, strategies=STRATEGIES, comparisons=_comparisons(conn))


def _comparisons(conn) -> list[dict]:
    """Models measured on the same validation patients (lungsql.model_comparison's split), the best
    first, with their ROC curves on one plot; only splits shared by two or more models."""
    rows = conn.execute(sa.text(
        "SELECT c.*, m.metrics FROM lungsql.model_comparison c JOIN lungsql.models m USING (model_id) "
        "WHERE c.split IS NOT NULL ORDER BY c.split, c.auc DESC NULLS LAST, c.model_id LIMIT :limit"),
        {"limit": MODELS_SHOWN}).mappings().all()
    splits: dict[str, list[dict]] = {}
    for row in rows:
        splits.setdefault(row["split"], []).append(dict(row))
    shown = []
    for split, models in splits.items():
        if len(models) < 2:
            continue
        labels = [f"{m['name']} v{m['version']} ({m['cnn_name'] or 'ensemble'})" for m in models]
        shown.append({"split": split, "models": models, "patients": models[0]["valid_patients"],
                      "chart": roc_overlay(list(zip(labels, (m["metrics"] for m in models)))), "labels": labels})
    return shown


@bp.post("/deploy")
def deploy():
    name = clean_query(request.form.get("name", ""), 200)
    strategy = request.form.get("strategy", "").strip()
    if not name or not (strategy in STRATEGIES or (registry.is_model_id(strategy) and len(strategy) < 10)):
        abort(400, description="Choose a model name and a strategy (best_score, most_recent, rollback or a "
                               "model id).")
    try:
        with transaction() as conn:  # the deployment and its audit row commit together, or neither
            model_id = conn.execute(sa.text("SELECT lungsql.deploy(:name, :strategy)"),
                                    {"name": name, "strategy": strategy}).scalar_one()
            audit.record("deploy", detail={"name": name, "strategy": strategy, "model_id": model_id})
    except sa.exc.DBAPIError as exc:
        message, hint = refusal(exc, f"deploying {name!r} ({strategy})")
        audit.record("deploy_failed", detail={"name": name, "strategy": strategy, "error": message})
        flash(f"Not deployed: {message}" + (f" ({hint})" if hint else ""), "error")
        return redirect(url_for("admin.models"), 303)
    current_app.logger.info("model %s deployed as %r (%s)", model_id, name, strategy)
    flash(f"Model {model_id} is now deployed as {name!r} ({strategy.replace('_', ' ')}).", "success")
    return redirect(url_for("admin.models"), 303)
