"""The CNN alone: ONNX Runtime images/s by batch size and session options, beside `lungsql bench`.

    .venv/bin/python -m bench.cnn_sessions                  # batch sizes 8, 16, 32, 64
    .venv/bin/python -m bench.cnn_sessions --compare        # also compare session options
    .venv/bin/python -m bench.cnn_sessions --model my.onnx --output features

The model is the built-in EfficientNet-Lite0 export (taken from the cache,
``$LUNGSQL_CACHE_DIR`` or ``~/.cache/lungsql``, exported there first if
missing; needs the 'export' extra then) or any ONNX CNN given with --model.
Throughput is images per second over at least --seconds of timed runs after
--warmup untimed runs, on one fixed random batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lungsql.ml.cnn_export import default_cache_dir, export_builtin
from lungsql.ml.onnx_inspect import describe_onnx

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
MODES = {
    "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
    "parallel": ort.ExecutionMode.ORT_PARALLEL,
}


@dataclass
class Config:
    label: str
    level: str = "all"
    mode: str = "sequential"
    intra: int = 0  # 0: number of cores (set explicitly below)
    inter: int = 1
    spinning: bool | None = None  # None: onnxruntime's default (spin)
    from_saved: bool = False  # load a model pre-optimized at `level`, optimizations off


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def make_session(model: bytes | str, cfg: Config, cores: int) -> tuple[ort.InferenceSession, float]:
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[cfg.level]
    so.execution_mode = MODES[cfg.mode]
    so.intra_op_num_threads = cfg.intra or cores
    so.inter_op_num_threads = cfg.inter
    if cfg.spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if cfg.spinning else "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "1" if cfg.spinning else "0")
    t0 = time.perf_counter()
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return sess, time.perf_counter() - t0


def save_optimized(model: bytes, level: str, path: str) -> None:
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.optimized_model_filepath = path
    so.log_severity_level = 3  # the "hardware specific optimizations" warning is expected here
    ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _busy_cpu_seconds() -> float | None:
    """CPU seconds spent busy by the whole machine so far (Linux /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class Measure:
    images_per_s: float
    other_load: float | None  # cores kept busy by other processes meanwhile


def throughput(sess, feed: dict, batch: int, warmup: int, seconds: float, min_runs: int = 3) -> Measure:
    """Images/s over all timed runs, and how busy the rest of the machine was."""
    wanted = [sess.get_outputs()[0].name]  # the pooled features only, as the featurizer asks
    for _ in range(warmup):
        sess.run(wanted, feed)
    times = []
    busy0, own0 = _busy_cpu_seconds(), _own_cpu_seconds()
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        sess.run(wanted, feed)
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    busy1, own1 = _busy_cpu_seconds(), _own_cpu_seconds()
    other = None
    if busy0 is not None and busy1 is not None:
        other = max(0.0, ((busy1 - busy0) - (own1 - own0)) / wall)
    return Measure(batch * len(times) / sum(times), other)


def summarize(ms: list[Measure], max_other: float) -> tuple[float, float, float | None, int, float | None]:
    """(median, best, median of quiet rounds or None, number of quiet rounds,
    median cores used by other processes)."""
    ips = [m.images_per_s for m in ms]
    quiet = [m.images_per_s for m in ms if m.other_load is not None and m.other_load <= max_other]
    others = [m.other_load for m in ms if m.other_load is not None]
    return (
        statistics.median(ips),
        max(ips),
        statistics.median(quiet) if quiet else None,
        len(quiet),
        statistics.median(others) if others else None,
    )


def _q(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def load_model(args) -> tuple[bytes, dict]:
    if args.model:
        data = Path(args.model).read_bytes()
    else:
        t0 = time.perf_counter()
        exp = export_builtin("efficientnet-lite0", cache_dir=default_cache_dir())
        how = "cache" if exp.from_cache else f"fresh export ({exp.export_seconds:.1f} s)"
        print(f"model: {exp.path} [{how}, {time.perf_counter() - t0:.1f} s]")
        data = exp.onnx_bytes
    info = describe_onnx(data, args.output)
    return data, info


def input_batch(info: dict, batch: int, rng: np.random.Generator) -> np.ndarray:
    size = info["input_size"] or 224
    h, w = (size, size) if isinstance(size, int) else size
    c = info["input_channels"] if isinstance(info["input_channels"], int) else 3
    shape = (batch, c, h, w) if info["input_layout"] == "NCHW" else (batch, h, w, c)
    return rng.standard_normal(shape, dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="ONNX file (default: the built-in EfficientNet-Lite0 export)")
    p.add_argument("--output", help="output tensor name for --model, if ambiguous")
    p.add_argument("--batches", default="8,16,32,64", help="comma-separated batch sizes")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before timing")
    p.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (median, best)")
    p.add_argument("--max-other", type=float, default=0.25,
                   help="a round is 'quiet' if other processes kept at most this many cores busy")
    p.add_argument("--compare", action="store_true", help="compare session options too")
    p.add_argument("--compare-batch", type=int, default=32, help="batch size for --compare")
    p.add_argument("--only", default="", help="with --compare: comma-separated substrings of config labels to run")
    p.add_argument("--skip-table", action="store_true", help="skip the batch-size table")
    args = p.parse_args(argv)

    cores = cpu_count()
    data, info = load_model(args)
    print(
        f"onnxruntime {ort.__version__}, {cores} cores, model {len(data) / 1e6:.1f} MB, "
        f"input {info['input_name']} {info['input_shape']}, "
        f"output {info['output_name']} dim {info['feature_dim']}"
    )
    rng = np.random.default_rng(0)

    if args.skip_table:
        if args.compare:
            compare(data, info, cores, args, rng)
        return 0
    base = Config("ORT_ENABLE_ALL, sequential, intra=cores, inter=1")
    sess, load_s = make_session(data, base, cores)
    print(f"\nsession: {base.label} (created in {load_s * 1000:.0f} ms)")
    batches = [int(x) for x in args.batches.split(",") if x]
    feeds = {b: {info["input_name"]: input_batch(info, b, rng)} for b in batches}
    runs: dict[int, list[Measure]] = {b: [] for b in batches}
    for _ in range(args.rounds):  # interleaved, so load from other processes spreads evenly
        for b in batches:
            runs[b].append(throughput(sess, feeds[b], b, args.warmup, args.seconds))
    print(
        f"images/s over {args.rounds} rounds of >= {args.seconds:g} s; 'quiet' = median of the "
        f"rounds while other processes used <= {args.max_other:g} cores; 'others' = median "
        "cores other processes used"
    )
    print(f"{'batch':>6} {'median':>8} {'best':>8} {'quiet':>8} {'#quiet':>6} {'others':>6}")
    for b in batches:
        med, best, quiet, nq, oth = summarize(runs[b], args.max_other)
        print(f"{b:>6} {med:>8.1f} {best:>8.1f} {_q(quiet):>8} {nq:>6} {_q(oth):>6}")
    del sess

    if args.compare:
        compare(data, info, cores, args, rng)
    return 0


def compare(data: bytes, info: dict, cores: int, args, rng) -> None:
    b = args.compare_batch
    feed = {info["input_name"]: input_batch(info, b, rng)}
    configs = [
        Config("level=disable", level="disable"),
        Config("level=basic", level="basic"),
        Config("level=extended", level="extended"),
        Config("level=all (default)", level="all"),
        Config("level=all, spinning off", spinning=False),
        Config("level=all, intra=1", intra=1),
        Config(f"level=all, intra={cores}, inter={cores}, parallel", mode="parallel", inter=cores),
        Config(f"level=all, intra=1, inter={cores}, parallel", mode="parallel", intra=1, inter=cores),
        Config("saved ORT_ENABLE_ALL model, level=disable", level="all", from_saved=True),
    ]
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        configs = [c for c in configs if any(w in c.label for w in wanted)]
    print(f"\ncomparing session options at batch {b} (intra=cores={cores} unless stated)")
    sessions = []
    with tempfile.TemporaryDirectory(prefix="lungsql-bench-") as tmp:
        for cfg in configs:
            if cfg.from_saved:
                path = os.path.join(tmp, f"opt-{cfg.level}.onnx")
                save_optimized(data, cfg.level, path)
                run_cfg = Config(cfg.label, level="disable", mode=cfg.mode, intra=cfg.intra, inter=cfg.inter)
                sess, load_s = make_session(path, run_cfg, cores)
            else:
                sess, load_s = make_session(data, cfg, cores)
            sessions.append((cfg, sess, load_s, []))
    for _ in range(args.rounds):  # interleaved rounds
        for cfg, sess, _, ms in sessions:
            ms.append(throughput(sess, feed, b, args.warmup, args.seconds))
    print(f"images/s over {args.rounds} rounds of >= {args.seconds:g} s ('quiet' as above)")
    print(f"{'config':<48} {'create ms':>9} {'median':>8} {'best':>8} {'quiet':>8} {'#quiet':>6} {'others':>6}")
    scored = []
    for cfg, _, load_s, ms in sessions:
        med, best, quiet, nq, oth = summarize(ms, args.max_other)
        scored.append((quiet, best, cfg.label))
        print(f"{cfg.label:<48} {load_s * 1000:>9.0f} {med:>8.1f} {best:>8.1f} {_q(quiet):>8} {nq:>6} {_q(oth):>6}")
    if all(q is not None for q, _, _ in scored):
        quiet, _, label = max(scored, key=lambda t: t[0])
        print(f"\nfastest (quiet median): {label} ({quiet:.1f} images/s)")
    else:
        _, best, label = max(scored, key=lambda t: t[1])
        print(f"\nfastest (best round; not every config had a quiet round): {label} ({best:.1f} images/s)")

if __name__ == "__main__":
    raise SystemExit(main())
