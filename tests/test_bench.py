"""`lungsql bench --quick` keeps working: every section has figures, and BENCHMARKS.md is left alone.

Benchmarks are not tests; this is the smoke test `make test` runs (in its own throwaway cluster)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from lungsql.client.cli import main

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def test_quick_bench_writes_every_section(tmp_path):
    before = BENCHMARKS_MD.read_bytes() if BENCHMARKS_MD.exists() else None
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())

    assert results["quick"] is True
    assert results["machine"]["cores"] >= 1 and results["machine"]["postgresql"]
    up = results["upload"]
    assert up["files"] > 0 and up["files_per_s"] > 0 and up["mb_per_s"] > 0 and up["ratio_to_pydicom"] > 0
    fe = results["featurization"]
    assert fe["end_to_end"]["slices"] == up["files"] and fe["end_to_end"]["slices_per_s"] > 0
    assert fe["bare_onnxruntime"]["slices_per_s"] > 0 and fe["efficiency"] > 0
    assert set(fe["time_split"]["steps"]) == {"reading", "decoding", "preprocessing", "cnn", "writing"}
    assert all(step["cpu_seconds"] >= 0 for step in fe["time_split"]["steps"].values())
    assert fe["time_split"]["steps"]["cnn"]["cpu_seconds"] > 0 and fe["time_split"]["cores_busy"] > 0
    assert {"fp32", "int8"} <= set(fe["variants"]) and fe["fastest"] in fe["variants"]
    for name, variant in fe["variants"].items():
        assert variant["end_to_end"]["slices"] == up["files"] and len(variant["end_to_end"]["runs_slices_per_s"]) == 3
        assert variant["bare"]["slices_per_s"] > 0 and variant["efficiency"] > 0
        if name != "fp32":  # each reduced-precision variant measured against fp32 on the stored CT
            assert variant["agreement"]["images"] > 0 and variant["agreement"]["cosine_mean"] >= 0.98
    assert set(fe["shards_of_variant"]) == {"fp32", fe["fastest"]}
    assert "efficiency (end to end / bare)" in result.output and "cosine similarity to fp32" in result.output
    assert [s["sessions"] for s in fe["shards"]] == [1, 2]
    assert all(s["slices"] == up["files"] and s["slices_per_s"] > 0 for s in fe["shards"])
    assert all(p["seconds"] > 0 and 0 <= p["auc"] <= 1 for p in results["training"]["points"])
    sc = results["scoring"]
    assert sc["warm_p50_ms"] > 0 and sc["warm_p99_ms"] >= sc["warm_p50_ms"] and sc["first_call_ms"] > 0
    assert sc["batch_patients_per_s"] > 0
    pacs = results["pacs"]
    assert all(pacs[way]["stored"] == up["files"] and pacs[way]["files_per_s"] > 0
               for way in ("dicomweb", "dimse_c_get", "listener_push"))
    sp = results["spark"]
    assert [r["cores"] for r in sp["runs"]] == [1, 2] and all(r["slices"] == up["files"] for r in sp["runs"])
    assert [s["studies"] for s in sp["sizing"]] == [1_000, 100_000, 1_000_000]
    ex = results["explain"]
    assert ex["patients"] > 0 and ex["explain_p50_ms"] > 0 and ex["heatmap_warm_p50_s"] > 0
    assert ex["export"]["max_abs_difference"] < 1e-5 and ex["export"]["bytes"] > 0
    assert "| PACS |" in result.output and "| Explanations |" in result.output
    xr = results["radiographs"]
    assert xr["images"] > 0 and xr["featurize_images_per_s"] > 0 and xr["score_one_p50_ms"] > 0
    assert set(xr["auc"]) == {"Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema",
                              "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening",
                              "Pneumonia", "Pneumothorax"}
    assert "| Radiographs |" in result.output
    reading = sp["reading"]
    assert reading.get("skipped") or (reading["jdbc_mb_per_s"] > 0 and reading["connection_per_partition_mb_per_s"] > 0)
    web = results["web"]
    assert web["client"] == "wrk" and web["requests"] > 0 and web["requests_per_s"] > 0 and web["errors"] == 0
    assert web["warmup"]["requests"] > 0 and web["warmup"]["errors"] == 0, web["warmup"]["first_errors"]
    assert [f["clients"] for f in web["fewer_clients"]] == [1] and web["fewer_clients"][0]["p99_ms"] > 0
    gpu = results["gpu"]
    assert (gpu["available"] is False and gpu["reason"]) or "CUDAExecutionProvider" in gpu["providers"]
    assert "| Featurization |" in result.output  # the table is shown

    after = BENCHMARKS_MD.read_bytes() if BENCHMARKS_MD.exists() else None
    assert after == before, "a quick run must not write BENCHMARKS.md"
