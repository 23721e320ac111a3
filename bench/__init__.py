"""The benchmark suite: `lungsql bench` measures upload, featurization, training, scoring and the web
app in one run on one machine, in a throwaway PostgreSQL cluster, and writes the figures as JSON and
as a Markdown table in BENCHMARKS.md (see BENCHMARKS.md for what each figure means).

Benchmarks are not tests: `make test` only runs `lungsql bench --quick` as a smoke test.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from lungsql.bench.sizes import FULL, QUICK

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


#: The sections of a run, in order, and the sections each needs before it (`--only`).
SECTIONS = ("upload", "pacs", "featurization", "spark", "training", "scoring", "explain", "web", "radiographs")
NEEDS = {"pacs": ("upload",), "featurization": ("upload",), "spark": ("featurization",),
         "training": ("featurization",), "scoring": ("training",), "explain": ("scoring",), "web": ("scoring",)}


def selected(only: Sequence[str] | None) -> list[str]:
    """The sections a run takes: all of them, or those of `only` and what they need, in run order."""
    if not only:
        return list(SECTIONS)
    unknown = [name for name in only if name not in SECTIONS]
    if unknown:
        raise ValueError(f"no benchmark section {unknown[0]!r}; the sections are {', '.join(SECTIONS)}")
    wanted: set[str] = set()
    stack = list(only)
    while stack:
        name = stack.pop()
        if name not in wanted:
            wanted.add(name)
            stack.extend(NEEDS.get(name, ()))
    return [name for name in SECTIONS if name in wanted]


def run(out: Path | None = None, quick: bool = False, keep: bool = False, provider: str | None = None,
        markdown: Path | None = None, say: Callable[[str], None] = print,
        only: Sequence[str] | None = None) -> dict:
    """Run every benchmark (or those of `only` and the sections they need); write the JSON to `out`
    (quick or partial: a temporary file when None) and, for a full run that is not `quick`, the table
    into `markdown` (default BENCHMARKS.md). Returns the results."""
    from lungsql.bench import (explain, featurize, gpu, machine, pacs, radiographs, report, scoring, spark,
                               training, upload, web)
    from lungsql.bench.database import throwaway

    sections = selected(only)
    partial = len(sections) < len(SECTIONS)
    sizes = QUICK if quick else FULL
    started = time.perf_counter()
    results: dict = {"quick": quick, "sizes": sizes.as_json()}
    if partial:
        results["sections"] = sections
    with throwaway(keep=keep, say=say) as db, tempfile.TemporaryDirectory(prefix="lungsql-bench-") as work:
        results["machine"] = machine.describe(db.engine)
        load = results["machine"]["load_average"][0]
        if load > 1.0:
            results["note"] = (f"the machine was not quiet: load average {load:.2f} at the start "
                               f"(other processes ran beside the benchmark), so figures may be low")
        cohort = None

        def measured(section: str) -> bool:
            """Asked for, not only needed by a section asked for (`only`): a prerequisite is set up
            in the cheapest way that gives the later sections what they read."""
            # Spark is compared with the database's own rate: it needs featurization measured.
            return not only or section in only or (section == "featurization" and "spark" in only)

        for section in sections:
            if section == "upload":
                say("upload: lungsql ingest against pydicom alone")
                results["upload"], cohort = upload.run(db.engine, Path(work), sizes)
            elif section == "pacs":
                say("PACS: the same files pulled from Orthanc (DICOMweb, C-GET) and pushed to the listener")
                results["pacs"] = pacs.run(db, cohort, results["upload"], patients=sizes.pacs_patients)
            elif section == "featurization" and not measured(section):
                say("featurization (not measured): CALL lungsql.generate_features() for the sections after it")
                featurize.setup(db)
            elif section == "featurization":
                say("featurization: CALL lungsql.generate_features against the bare CNN, for each variant")
                results["featurization"] = featurize.run(db, sizes, provider=provider)
            elif section == "spark":
                say("Spark: the same featurization on local[1] and local[2]")
                results["spark"] = spark.run(db, results["featurization"]["end_to_end"]["slices_per_s"])
            elif section == "training" and not measured(section):
                say("training (not measured): SELECT * FROM lungsql.train_model() for the sections after it")
                training.setup(db)
            elif section == "training":
                say("training: pipeline.fit on synthetic features")
                results["training"] = training.run(db, sizes)
            elif section == "scoring":
                say("scoring: lungsql.predict_lung_cancer")
                results["scoring"] = scoring.run(db, sizes)
            elif section == "explain":
                say("explanations: lungsql.explain_prediction, lungsql.slice_heatmap and the exported model")
                results["explain"] = explain.run(db, patients_at_most=sizes.explain_patients)
            elif section == "web":
                say(f"web app: {sizes.web_clients} clients for {sizes.web_seconds:g} s")
                results["web"] = web.run(db, sizes)
            elif section == "radiographs":
                # After the web app's run, which measures the CT pages on the database as it was before.
                say("radiographs: ChestX-ray14-sized PNGs uploaded, featurized, trained on and scored")
                results["radiographs"] = radiographs.run(db, patients=sizes.xray_patients)
    results["gpu"] = gpu.status()
    results["seconds"] = round(time.perf_counter() - started, 1)
    if out is None:
        out = (Path(tempfile.gettempdir()) / f"lungsql-bench-{'quick' if quick else 'partial'}.json"
               if quick or partial else Path("bench-results.json"))
    out = Path(out)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    say(f"results written to {out}")
    if not quick and not partial:
        target = Path(markdown) if markdown else BENCHMARKS_MD
        report.update_markdown(target, results)
        say(f"table written to {target}")
    if partial:  # the table needs every section: the figures of those that ran
        print(json.dumps({name: results[name] for name in sections if name in results}, indent=2, default=str))
    else:
        print(report.render_table(results))
    return results
