"""The results as Markdown: the machine, one table of figures with their targets, and the details
(time split, shard sessions, training curve), written between the markers of BENCHMARKS.md."""

from __future__ import annotations

import re
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
TARGET_EFFICIENCY = 0.85
TARGET_UPLOAD_RATIO = 0.25  # lungsql ingest against pydicom reading the same files


def _met(target: dict | None) -> str:
    if not target:
        return ""
    return "met" if target["met"] else "not met"


def _row(section: str, figure: str, value: str, target: str = "", met: str = "") -> str:
    return f"| {section} | {figure} | {value} | {target} | {met} |"


def _radiograph_rows(x: dict | None) -> list[str]:
    if not x:
        return []
    where = f"{x['images']} synthetic radiographs, {x['side']} x {x['side']} PNG"
    return [
        _row("Radiographs", f"`lungsql ingest --task chest_xray14`, {where}", f"{x['upload_s_per_1000']:.1f} s per 1,000"),
        _row("Radiographs", f"`CALL lungsql.generate_features(task => 'chest_xray14')` ({x['provider']})",
             f"{x['featurize_s_per_1000']:.1f} s per 1,000 ({x['featurize_images_per_s']:.0f} images/s)"),
        _row("Radiographs", "`lungsql.train_findings()`, 14 boosters",
             f"{x['train_s']:.1f} s, mean validation AUC {x['mean_auc']:.3f}" if x.get("mean_auc") is not None
             else f"{x['train_s']:.1f} s"),
        _row("Radiographs", "`lungsql.predict_findings`, one image, warm p50 / p99",
             f"{x['score_one_p50_ms']:.1f} / {x['score_one_p99_ms']:.1f} ms (14 findings)"),
        _row("Radiographs", "`lungsql.predict_findings_batch`, every image",
             f"{x['score_batch_s_per_1000']:.2f} s per 1,000"),
    ]


def _pacs_rows(pacs: dict | None) -> list[str]:
    if not pacs:
        return []
    ways = (("dicomweb", "`lungsql pacs pull --url` (QIDO-RS + WADO-RS) from Orthanc"),
            ("dimse_c_get", "`lungsql pacs pull --dimse` (C-FIND + C-GET) from Orthanc"),
            ("listener_push", "Orthanc pushing to `lungsql listen` (C-STORE, a commit per instance)"))
    return [_row("PACS", f"{label}, {pacs['instances']} instances",
                 f"{pacs[way]['files_per_s']:.0f} instances/s, {pacs[way]['mb_per_s']:.1f} MB/s "
                 f"(x{pacs[way]['ratio_to_folder']:.2f} of the folder upload)") for way, label in ways]


def _explain_rows(ex: dict | None) -> list[str]:
    if not ex:
        return []
    export = ex["export"]
    return [
        _row("Explanations", f"`lungsql.explain_prediction`, warm, {ex['patients']} patients: p50, p99",
             f"{ex['explain_p50_ms']:.1f} ms, {ex['explain_p99_ms']:.1f} ms"),
        _row("Explanations", f"`lungsql.slice_heatmap` of the top group's slices ({ex['heatmaps']} maps), warm p50",
             f"{ex['heatmap_warm_p50_s'] * 1000:.0f} ms", f"<= {ex['target']['at_most']:g} s", _met(ex["target"])),
        _row("Explanations", "`lungsql.slice_heatmap`, first map of a session (opens the CNN)",
             f"{ex['heatmap_first_in_session_s'] * 1000:.0f} ms"),
        _row("Explanations", f"`lungsql model export` ({export['bytes'] / 1e6:.1f} MB) and ONNX Runtime alone "
                             f"against the database, {export['patients']} patients",
             f"{export['seconds']:.1f} s; largest difference {export['max_abs_difference']:.1e}; "
             f"{export['onnxruntime_p50_ms']:.0f} ms a patient"),
    ]


def _shard_runs(fe: dict) -> dict[str, list[dict]]:
    return fe.get("shards_of_variant") or {"fp32": fe["shards"]}


def _featurization_rows(fe: dict) -> list[str]:
    """Each variant of the CNN end to end, bare and the ratio, its features against fp32's, and the
    targets of fp32 and of the fastest variant."""
    ft = fe["targets"]
    variants = fe.get("variants") or {"fp32": {"cnn": fe.get("cnn", "fp32"), "runtime": "ONNX Runtime",
                                               "end_to_end": fe["end_to_end"], "bare": fe["bare_onnxruntime"],
                                               "efficiency": fe["efficiency"]}}
    fastest = fe.get("fastest", "fp32")
    rows = []
    for name, v in variants.items():
        e2e, bare = v["end_to_end"], v["bare"]
        runs = e2e.get("runs_slices_per_s")
        spread = f" (runs {min(runs):.0f}-{max(runs):.0f})" if runs else ""
        if name == "fp32":
            target, met = f">= {ft['end_to_end_slices_per_s']['at_least']:.0f}", _met(ft["end_to_end_slices_per_s"])
        elif name == fastest and "fastest_end_to_end_slices_per_s" in ft:
            target = f">= {ft['fastest_end_to_end_slices_per_s']['at_least']:.0f} (fastest)"
            met = _met(ft["fastest_end_to_end_slices_per_s"])
        else:
            target = met = ""
        rows.append(_row("Featurization", f"{v['cnn']} ({v['runtime']}): `CALL lungsql.generate_features`, "
                                          f"{e2e['slices']} slices, {e2e['provider']}",
                         f"{e2e['slices_per_s']:.0f} slices/s{spread}", target, met))
        bare_runs = bare.get("passes_slices_per_s")
        rows.append(_row("Featurization", f"{v['cnn']}: the bare CNN, batches in memory",
                         f"{bare['slices_per_s']:.0f} slices/s ({bare['images_per_s']:.0f} images/s)"
                         + (f" (passes {min(bare_runs):.0f}-{max(bare_runs):.0f})" if bare_runs else "")))
        key = "efficiency" if name == "fp32" else ("fastest_efficiency" if name == fastest else None)
        target = ft.get(key) if key else None
        rows.append(_row("Featurization", f"{v['cnn']}: efficiency (end to end / bare)", f"{v['efficiency']:.2f}",
                         f">= {target['at_least']}" if target else "", _met(target)))
        agreement = v.get("agreement")
        if agreement:
            target = (ft.get("cosine") or {}).get(name)
            rows.append(_row("Featurization", f"{v['cnn']}: features' cosine similarity to fp32 on the stored CT "
                                              f"({agreement['images']} images), mean and least",
                             f"{agreement['cosine_mean']:.4f}, {agreement['cosine_min']:.4f}",
                             f">= {target['at_least']}" if target else "", _met(target)))
    return rows


def render_table(r: dict) -> str:
    up, fe, tr, sc, web = r["upload"], r["featurization"], r["training"], r["scoring"], r["web"]
    rows = [
        "| Section | Figure | Value | Target | Met |",
        "| --- | --- | --- | --- | --- |",
        _row("Upload", f"`lungsql ingest`, {up['files']} files of 512x512 ({up['mb']} MB)",
             f"{up['files_per_s']:.0f} files/s, {up['mb_per_s']:.1f} MB/s"),
        _row("Upload", "pydicom alone (dcmread + PixelData), same files", f"{up['pydicom_files_per_s']:.0f} files/s"),
        _row("Upload", "ingest / pydicom", f"{up['ratio_to_pydicom']:.2f}", f">= {TARGET_UPLOAD_RATIO}",
             "met" if up["ratio_to_pydicom"] >= TARGET_UPLOAD_RATIO else "not met"),
        *_pacs_rows(r.get("pacs")),
        *_featurization_rows(fe),
        *[_row("Featurization", f"on Spark, local[{run['cores']}], {run['cores']} task(s)",
               f"{run['in_run_slices_per_s']:.0f} slices/s in the run (x{run['ratio_to_database']:.2f} of the "
               f"database), {run['slices_per_s']:.0f} for the whole job; Spark starts in {run['startup_s']:.1f} s") for run in (r.get("spark") or {}).get("runs", [])],
    ]
    for variant, runs in _shard_runs(fe).items():
        target = (fe["targets"].get("shards") or {}).get(variant)
        for s in runs:
            last = s is runs[-1] and target is not None
            rows.append(_row("Featurization", f"{s['sessions']} `shard` session(s) in parallel, {s.get('cnn', variant)}",
                             f"{s['in_run_slices_per_s']:.0f} slices/s (x{s['speedup']:.2f}); "
                             f"{s['slices_per_s']:.0f} counting the sessions' start",
                             f">= x{target['at_least']:.2f}" if last else "", _met(target) if last else ""))
    target = tr.get("target")
    for p in tr["points"]:
        is_target = target and p["patients"] == target["patients"]
        rows.append(_row("Training", f"`pipeline.fit`, {p['patients']} patients",
                         f"{p['seconds']:.1f} s (AUC {p['auc']:.2f})",
                         f"<= {target['at_most']:.0f} s" if is_target else "", _met(target) if is_target else ""))
    ind = tr["in_database"]
    rows.append(_row("Training", f"`lungsql.train_model()`, {ind['patients']} real patients",
                     f"{ind['seconds']:.1f} s"))
    rows += [
        _row("Scoring", f"`predict_lung_cancer` warm p50 ({sc['warm_calls']} calls)", f"{sc['warm_p50_ms']:.2f} ms",
             f"<= {sc['target']['at_most']:.0f} ms", _met(sc["target"])),
        _row("Scoring", "warm p99", f"{sc['warm_p99_ms']:.2f} ms"),
        _row("Scoring", "first call in a new session", f"{sc['first_call_ms']:.0f} ms"),
        _row("Scoring", "`predict_lung_cancer_batch`", f"{sc['batch_patients_per_s']:.0f} patients/s"),
        *_explain_rows(r.get("explain")),
        *_radiograph_rows(r.get("radiographs")),
        _row("Web app", f"prediction API, {web['clients']} clients (wrk), {web['seconds']:.0f} s; {web['server']}",
             f"{web['requests_per_s']:.0f} requests/s, {web['errors']} errors"),
        _row("Web app", "p50", f"{web['p50_ms']:.1f} ms"),
        _row("Web app", "p99", f"{web['p99_ms']:.1f} ms", f"<= {web['target']['at_most']:.0f} ms",
             _met(web["target"])),
    ]
    rows += [_row("Web app", f"{f['clients']} client{'s' if f['clients'] > 1 else ''}: p50, p99",
                  f"{f['p50_ms']:.1f} ms, {f['p99_ms']:.1f} ms ({f['requests_per_s']:.0f} requests/s)")
             for f in web.get("fewer_clients", [])]
    rows += [
        _row("GPU", "featurization on a GPU",
             "ran" if r["gpu"]["available"] else f"not run: {r['gpu']['reason']}",
             ">= 20000 slices/s (H100-class)", "" if r["gpu"]["available"] else "not measured"),
    ]
    return "\n".join(rows)


def render_machine(m: dict) -> str:
    v = m["versions"]
    load = ", ".join(f"{x:.2f}" for x in m["load_average"])
    return "\n".join([
        f"- CPU: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), {m['memory_gb']} GB memory",
        f"- {m['os']}; Python {m['python']}; PostgreSQL {m['postgresql']}",
        f"- numpy {v['numpy']}, onnxruntime {v['onnxruntime']}, lightgbm {v['lightgbm']}, pydicom {v['pydicom']}, "
        f"psycopg {v['psycopg']}, flask {v['flask']}, gunicorn {v['gunicorn']}",
        f"- commit {m['commit'] or 'unknown'}, {m['date']}; load average at the start {load}",
    ])


def render_details(r: dict) -> str:
    fe, tr = r["featurization"], r["training"]
    lines: list[str] = []
    variants = fe.get("variants") or {}
    if variants:
        lines += ["Each variant of the CNN, its runs and passes in turns (median, and the lowest and highest of "
                  f"the {len(variants['fp32']['end_to_end']['runs_slices_per_s'])} of each):", "",
                  "| CNN | Runs on | End to end, slices/s | Spread | Bare, slices/s | Efficiency of each turn | "
                  "Cosine to fp32 (mean, least) |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, v in variants.items():
            e2e, bare, agreement = v["end_to_end"], v["bare"], v.get("agreement")
            lines.append(
                f"| {v['cnn']} | {v['runtime']} | {e2e['slices_per_s']:.0f} ({min(e2e['runs_slices_per_s']):.0f}-"
                f"{max(e2e['runs_slices_per_s']):.0f}) | {e2e['spread']['relative']:.0%} | {bare['slices_per_s']:.0f} "
                f"({bare['spread']['min']:.0f}-{bare['spread']['max']:.0f}) | "
                f"{', '.join(f'{x:.2f}' for x in v['efficiency_of_each_turn'])} | "
                + (f"{agreement['cosine_mean']:.4f}, {agreement['cosine_min']:.4f} |" if agreement else "1 |"))
        lines.append("")
    shown = {"fp32": {"end_to_end": fe["end_to_end"], "time_split": fe["time_split"], "cnn": fe.get("cnn", "")}}
    if fe.get("fastest") and fe["fastest"] != "fp32":
        shown[fe["fastest"]] = variants[fe["fastest"]]
    for name, v in shown.items():
        split = v["time_split"]
        lines += [f"Where the cores went during `CALL lungsql.generate_features` with {v.get('cnn') or name} "
                  f"({split['slices']} slices, batch size {fe['batch_size']}, {fe['threads']} CNN threads): CPU time "
                  f"per step, summed over the threads that ran it ({split['cores_busy']:.2f} cores busy on average). "
                  "The steps overlap in time, so on a machine whose cores are all busy every millisecond outside the "
                  "CNN comes from it.", "", "| Step | CPU ms per slice | Share |", "| --- | --- | --- |"]
        for step, st in split["steps"].items():
            lines.append(f"| {step} | {st['ms_per_slice']:.2f} | {st['share']:.0%} |")
        lines.append("")
    lines += ["Shard sessions in parallel (`CALL lungsql.generate_features(shard => i, shards => N)`, each "
              "session's CNN on its share of the cores):", "",
              "| CNN | Sessions | Patients per session | Wall s (with start) | Slices/s (with start) | Slices/s (in run) | "
              "Speed-up (in run) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for variant, runs in _shard_runs(fe).items():
        for s in runs:
            lines.append(f"| {s.get('cnn', variant)} | {s['sessions']} | {', '.join(map(str, s['patients_per_session']))} | "
                         f"{s['wall_seconds']:.1f} | {s['slices_per_s']:.0f} | {s['in_run_slices_per_s']:.0f} | "
                         f"x{s['speedup']:.2f} |")
    sp = r.get("spark")
    if sp:
        lines += ["", "Featurization on Apache Spark (`lungsql featurize --engine spark`, a local master of N cores, "
                  "N tasks), against `CALL lungsql.generate_features` in the same run "
                  f"({sp['in_database_slices_per_s']:.0f} slices/s):", "",
                  "| Executor cores | Spark start-up s | Job s | Slices/s (job) | Slices/s (in run) | "
                  "In run, against the database |", "| --- | --- | --- | --- | --- | --- |"]
        for run in sp["runs"]:
            lines.append(f"| {run['cores']} | {run['startup_s']:.1f} | {run['seconds']:.1f} | "
                         f"{run['slices_per_s']:.0f} | {run['in_run_slices_per_s']:.0f} | "
                         f"x{run['ratio_to_database']:.2f} |")
        lines += ["", f"Scaling out, at the measured {sp['slices_per_s_per_core']:.0f} slices/s per core in the run "
                  f"(studies of 300 slices; GPUs not measured here):", "",
                  "| Studies | Slices | Core-hours | Cores to finish in a day |", "| --- | --- | --- | --- |"]
        for size in sp["sizing"]:
            lines.append(f"| {size['studies']:,} | {size['slices']:,} | {size['core_hours']:,.1f} | "
                         f"{size['cores_for_a_day']:,} |")
        reading = sp.get("reading") or {}
        if "jdbc_mb_per_s" in reading:
            lines += ["", f"How the tasks read the scans ({reading['mb']:.0f} MB of DICOM in {reading['partitions']} "
                      "partitions by a hash of patient_id, over TCP): a connection per partition (psycopg, what "
                      f"lungsql.spark does) {reading['connection_per_partition_mb_per_s']:.0f} MB/s; Spark's JDBC "
                      f"source (Debian's PostgreSQL driver) {reading['jdbc_mb_per_s']:.0f} MB/s "
                      f"(x{reading['jdbc_to_connection']:.2f})."]
    lines += ["", f"Training on synthetic features ({tr['groups_per_patient']} images per patient, "
              f"{tr['features_per_image']} features each):", "",
              "| Patients | Seconds | Validation AUC | Trees |", "| --- | --- | --- | --- |"]
    for p in tr["points"]:
        lines.append(f"| {p['patients']} | {p['seconds']:.1f} | {p['auc']:.3f} | {p['best_iteration']} |")
    return "\n".join(lines)


def _featurization_bound(v: dict, cores: int, fastest: bool) -> str:
    """The end-to-end rate a variant could reach with every core busy, from the CPU it spent outside
    the CNN per slice and the bare CNN's CPU per slice."""
    bare, e2e, steps = v["bare"], v["end_to_end"], v["time_split"]["steps"]
    cnn_bare = 1000 * cores / bare["slices_per_s"]  # ms of CPU per slice with every core on the CNN
    other = sum(s["ms_per_slice"] for name, s in steps.items() if name != "cnn")
    ceiling = bare["slices_per_s"] * cnn_bare / (cnn_bare + other)
    others = ", ".join(f"{name} {step['ms_per_slice']:.2f}" for name, step in steps.items() if name != "cnn")
    return (
        f"- **Featurization, {v['cnn']}{' (the fastest variant)' if fastest else ''}.** The bare CNN needs "
        f"{cnn_bare:.2f} ms of CPU per slice ({cores} cores at {bare['slices_per_s']:.0f} slices/s). Inside the run, "
        f"reading, decoding, preprocessing and writing took {other:.2f} ms more per slice ({others}). With every core "
        f"busy the end to end rate is at most bare x {cnn_bare:.2f} / ({cnn_bare:.2f} + {other:.2f}) = {ceiling:.0f} "
        f"slices/s (efficiency {ceiling / bare['slices_per_s']:.2f}); it ran at {e2e['slices_per_s']:.0f}, the CNN "
        f"itself taking {steps['cnn']['ms_per_slice']:.2f} ms per slice beside the other threads. An efficiency of "
        f"{TARGET_EFFICIENCY} needs the other steps under {cnn_bare * (1 - TARGET_EFFICIENCY) / TARGET_EFFICIENCY:.2f} "
        f"ms per slice.")


def render_limits(r: dict) -> str:
    """What bounds the featurization and web figures, computed from this run's own measurements."""
    fe, web, cores = r["featurization"], r["web"], r["machine"]["cores_usable"]
    lines = ["What bounds the figures (computed from this run):", ""]
    shown = {"fp32": {"cnn": fe.get("cnn", "fp32"), "bare": fe["bare_onnxruntime"], "end_to_end": fe["end_to_end"],
                      "time_split": fe["time_split"]}}
    if fe.get("fastest") and fe["fastest"] != "fp32":
        shown[fe["fastest"]] = fe["variants"][fe["fastest"]]
    for name, v in shown.items():
        lines.append(_featurization_bound(v, cores, fastest=name != "fp32"))
    if "cpu_ms_per_request" in web and web.get("fewer_clients"):
        cpu, one = web["cpu_ms_per_request"], web["fewer_clients"][0]
        lines.append(
            f"- **Web app.** One client alone gets its answer in {one['p50_ms']:.1f} ms (p50). Each request costs "
            f"{cpu['whole_machine']:.2f} ms of CPU on the machine ({cpu['web_processes']:.2f} in the web processes, "
            f"{cpu['database']:.2f} in PostgreSQL, the rest wrk and the kernel), so {cores} cores serve at most about "
            f"{1000 * cores / cpu['whole_machine']:.0f} requests/s; it served {web['requests_per_s']:.0f}. "
            f"{web['clients']} clients that each send their next request as soon as the last is answered keep "
            f"{web['clients']} requests in the server, so the latency is about {web['clients']} / throughput = "
            f"{1000 * web['clients'] / web['requests_per_s']:.0f} ms before any variation: a p99 of "
            f"{web['target']['at_most']:.0f} ms would need more than {1000 * web['clients'] / web['target']['at_most']:.0f} "
            f"requests/s, {1000 * web['clients'] / web['target']['at_most'] * cpu['whole_machine'] / 1000:.1f} "
            f"cores at this cost per request.")
    return "\n".join(lines)


def render_section(r: dict) -> str:
    gpu = r["gpu"]
    gpu_line = ("GPU: featurization ran on " + ", ".join(gpu["providers"]) + "." if gpu["available"] else
                f"GPU: not measured, {gpu['reason']}. {gpu['how_to_run'][0].upper() + gpu['how_to_run'][1:]}.")
    parts = [START, "", "Machine:", "", render_machine(r["machine"]), ""]
    if r.get("note"):
        parts += [f"Note: {r['note']}", ""]
    parts += [render_table(r), "", gpu_line, "", render_limits(r), "", render_details(r), "",
              f"The whole run took {r['seconds']:.0f} s. Raw figures: `bench-results.json`.", "", END]
    return "\n".join(parts)


def update_markdown(path: Path, results: dict) -> None:
    """Rewrite the section between the markers (the intro around it stays as written)."""
    path = Path(path)
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    section = render_section(results)
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
