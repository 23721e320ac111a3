"""The model registry's rules: which model answers for a name.

* After training, the first model of a name is deployed on its own
  (strategy 'first model'); a later one replaces the deployed model only with
  a lower validation log loss (strategy 'best_score').
* ``deploy`` chooses by strategy: 'best_score' (the lowest validation log loss,
  the newest model on a tie), 'most_recent', 'rollback' (the model deployed
  before the current one, skipping deployments of the current model itself),
  or a model id of that name.

The rules are written here once, for lungsql.server.pipeline (PostgreSQL, the CLI),
for lungsql.server.mssql (SQL Server's procedures) and for the web app's form. This
module reads no database and imports nothing heavy: its callers hand it plain
data, and the web app can import it without the ML stack.

A model is a mapping with ``model_id`` and ``metrics`` (the validation metrics,
a dict or its JSON text, with ``log_loss``); a deployment history is the model
ids deployed under a name, the newest first.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from lungsql.errors import ConfigurationError

#: The strategies `choose` knows by name; a model id (ASCII digits) is the fourth way.
STRATEGIES = ("best_score", "most_recent", "rollback")
#: What a deployment row records when `after_training` deploys the first model of a name.
FIRST_MODEL = "first model"
#: How to train a model, as the PostgreSQL hint says it.
TRAIN_HINT = "SELECT * FROM lungsql.train_model('...')"


def clean_strategy(strategy: Any) -> str:
    """The strategy as `choose` reads it and a deployment row records it."""
    return str(strategy).strip()


def is_model_id(strategy: str) -> bool:
    """Whether a strategy names a model by its id."""
    return strategy.isascii() and strategy.isdigit()


def log_loss(model: Mapping[str, Any]) -> float:
    """A model's validation log loss, from its metrics (a dict or JSON text)."""
    metrics = model["metrics"]
    if isinstance(metrics, (str, bytes)):
        metrics = json.loads(metrics)
    return float(metrics["log_loss"])


def choose(model_name: str, models: Sequence[Mapping[str, Any]], history: Sequence[int], strategy: str,
           train_hint: str = TRAIN_HINT) -> int:
    """The id of the model `strategy` deploys as `model_name`.

    `models` are the models of that name, `history` the model ids deployed
    under it, the newest first; `train_hint` says how to train one on this host.
    Raises ConfigurationError saying what is wrong and what to do.
    """
    if not models:
        raise ConfigurationError(f"there is no model named {model_name!r}", hint=f"train one first: {train_hint}")
    strategy = clean_strategy(strategy)
    if strategy == "best_score":
        return int(min(models, key=lambda m: (log_loss(m), -int(m["model_id"])))["model_id"])
    if strategy == "most_recent":
        return max(int(m["model_id"]) for m in models)
    if strategy == "rollback":
        if len(history) < 2:
            raise ConfigurationError(f"{model_name!r} has no earlier deployment to roll back to")
        current = history[0]
        chosen = next((m for m in history[1:] if m != current), None)
        if chosen is None:
            raise ConfigurationError(f"every earlier deployment of {model_name!r} is the current model")
        return int(chosen)
    if is_model_id(strategy):
        chosen = int(strategy)
        if chosen not in {int(m["model_id"]) for m in models}:
            raise ConfigurationError(f"model {chosen} is not a model named {model_name!r}",
                                     hint="SELECT model_id, name, version FROM lungsql.models")
        return chosen
    raise ConfigurationError(f"unknown strategy {strategy!r}",
                             hint="use 'best_score', 'most_recent', 'rollback' or a model id")


def after_training(model_name: str, new_model: Mapping[str, Any],
                   deployed: Mapping[str, Any] | None) -> tuple[str | None, str]:
    """Whether a model just trained as `model_name` is deployed: (the strategy its deployment
    row records, or None to leave `deployed` in place; the NOTICE saying so).

    `deployed` is the model deployed as that name now (None: there is none).
    """
    model_id = new_model["model_id"]
    if deployed is None:
        return FIRST_MODEL, f"model {model_id} deployed as {model_name!r}: the first of its name"
    new, old = log_loss(new_model), log_loss(deployed)
    if new < old:
        return "best_score", (f"model {model_id} deployed as {model_name!r}: validation log loss "
                              f"{new:.4f} beats {old:.4f}")
    return None, (f"model {deployed['model_id']} stays deployed as {model_name!r}: it has the better "
                  "validation log loss")
