"""The registry's rules (lungsql.registry) on plain data: no database, no ML code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lungsql import registry
from lungsql.errors import ConfigurationError


def model(model_id: int, log_loss: float, as_text: bool = False) -> dict:
    metrics = {"auc": 0.7, "log_loss": log_loss}
    return {"model_id": model_id, "metrics": json.dumps(metrics) if as_text else metrics}


MODELS = [model(3, 0.50), model(5, 0.30, as_text=True), model(8, 0.30), model(9, 0.40)]


def choose(strategy, history=(), models=MODELS, name="lgbm"):
    return registry.choose(name, models, list(history), strategy)


def refused(strategy, history=(), models=MODELS, name="lgbm", **kwargs) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as caught:
        registry.choose(name, models, list(history), strategy, **kwargs)
    return caught.value


# -- choose ------------------------------------------------------------------------------------
def test_best_score_is_the_lowest_log_loss_and_the_newest_on_a_tie():
    assert choose("best_score") == 8  # 5 and 8 tie at 0.30: the newer one
    assert choose("best_score", models=[model(5, 0.30), model(8, 0.31)]) == 5
    assert choose("best_score", models=[model(8, 0.30), model(5, 0.30)]) == 8  # not the order given
    assert choose("best_score", models=[model(4, 0.9)]) == 4


def test_metrics_may_be_json_text_or_a_dict():
    assert registry.log_loss(model(1, 0.25, as_text=True)) == registry.log_loss(model(1, 0.25)) == 0.25
    assert registry.log_loss({"model_id": 1, "metrics": b'{"log_loss": 0.5}'}) == 0.5


def test_most_recent_is_the_highest_model_id():
    assert choose("most_recent") == 9
    assert choose("most_recent", models=[model(9, 0.1), model(2, 0.1)]) == 9


def test_rollback_is_the_previous_deployment_other_than_the_current_model():
    assert choose("rollback", history=[8, 3]) == 3
    assert choose("rollback", history=[8, 8, 8, 5, 3]) == 5  # redeployments of the current one are skipped
    assert choose("rollback", history=[3, 8, 3]) == 8
    # Rolling back needs no current model among the name's models (the history says what was deployed).
    assert choose("rollback", history=[9, 5], models=[model(5, 0.3)]) == 5


def test_rollback_without_an_earlier_deployment_is_refused():
    error = refused("rollback", history=[])
    assert error.message == "'lgbm' has no earlier deployment to roll back to" and error.hint is None
    assert refused("rollback", history=[8]).message == "'lgbm' has no earlier deployment to roll back to"
    error = refused("rollback", history=[8, 8, 8])
    assert error.message == "every earlier deployment of 'lgbm' is the current model" and error.hint is None


def test_a_model_id_deploys_that_model_of_the_name():
    assert choose("5") == 5
    assert choose(" 3 ") == 3
    error = refused("4")
    assert error.message == "model 4 is not a model named 'lgbm'"
    assert error.hint == "SELECT model_id, name, version FROM lungsql.models"
    assert refused("12345678901234567890").message.startswith("model 12345678901234567890 is not")


def test_an_unknown_strategy_says_which_there_are():
    for strategy in ("newest", "Best_Score", "", "-3", "3.0", "²"):  # '²'.isdigit() is True, but it is no id
        error = refused(strategy)
        assert error.message == f"unknown strategy {strategy!r}"
        assert error.hint == "use 'best_score', 'most_recent', 'rollback' or a model id"


def test_a_name_without_models_is_refused_before_the_strategy_is_read():
    for strategy in ("best_score", "rollback", "newest", "3"):
        error = refused(strategy, models=[], name="other")
        assert error.message == "there is no model named 'other'"
        assert error.hint == "train one first: SELECT * FROM lungsql.train_model('...')"
    error = refused("best_score", models=[], train_hint="EXEC dbo.TrainLungCancerModel")
    assert error.hint == "train one first: EXEC dbo.TrainLungCancerModel"


def test_strategies_are_cleaned_as_the_deployment_row_records_them():
    assert registry.clean_strategy("  most_recent\n") == "most_recent"
    assert registry.clean_strategy(12) == "12"
    assert choose("  most_recent\t") == 9 and choose(5) == 5
    assert registry.STRATEGIES == ("best_score", "most_recent", "rollback")
    assert all(registry.is_model_id(s) for s in ("7", "0012"))
    assert not any(registry.is_model_id(s) for s in ("best_score", "", "-1", "1e3", "٣", "²"))


# -- after_training ------------------------------------------------------------------------------
def test_the_first_model_of_a_name_is_deployed_on_its_own():
    assert registry.after_training("lgbm", model(3, 0.9), None) == \
        ("first model", "model 3 deployed as 'lgbm': the first of its name")


def test_a_later_model_replaces_the_deployed_one_only_with_a_lower_log_loss():
    assert registry.after_training("lgbm", model(9, 0.25), model(8, 0.3, as_text=True)) == \
        ("best_score", "model 9 deployed as 'lgbm': validation log loss 0.2500 beats 0.3000")
    for worse in (0.3, 0.31):  # the same log loss is not better
        assert registry.after_training("lgbm", model(9, worse), model(8, 0.3)) == \
            (None, "model 8 stays deployed as 'lgbm': it has the better validation log loss")


# -- the module stays light ------------------------------------------------------------------------
def test_the_registry_imports_no_ml_code():
    code = ("import sys, lungsql.registry; "
            "print(sorted(m for m in ('numpy', 'pandas', 'lightgbm', 'onnxruntime', 'lungsql.server.pipeline') "
            "if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
