"""Checking a stored LightGBM model text before a process parses it.

LightGBM's C++ parser trusts its input.  A truncated tree section, ``tree_sizes``
that do not match the trees, or arrays that do not fit ``num_leaves`` make it
call ``abort()`` (an exception escaping an OpenMP region) or read out of
bounds, and a child index that points back up a tree makes ``predict`` loop
forever.  Inside a PostgreSQL backend a signal takes the backend down, and the
postmaster then ends every other session to recover.  So `check`, which
`lungsql.ml.scoring.load_model` calls once per model per process, runs after the
SHA-256 check and before this process hands the text to LightGBM:

1. `structure` reads the text in Python, which cannot crash: the header, the
   tree sections and their ``tree_sizes``, the length of every array of every
   tree, and the child indices, split features and categorical bounds that
   ``predict`` follows for any input, not only the rows the check scores;
2. `parse_in_child` parses it with ``lightgbm.Booster(model_str=...)`` in a
   separate Python process under memory and CPU limits and scores a row of
   zeros and a row of missing values.  That process is started by
   ``subprocess`` with an explicit interpreter (inside a backend
   ``sys.executable`` is not Python, and forking a backend that runs OpenMP
   threads is unsafe); if it dies by a signal, runs too long or says
   something unexpected, the model is refused and nothing is scored.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lungsql.errors import ConfigurationError

__all__ = ["CHECK_TIMEOUT_S", "MEMORY_LIMIT_BYTES", "Malformed", "Structure", "check", "check_many", "checked_clear",
           "parse_in_child", "python_interpreter", "structure"]

#: Seconds the check process may take (wall clock, and CPU through RLIMIT_CPU).
CHECK_TIMEOUT_S = 60
#: Address space of the check process (RLIMIT_AS), plus 8 bytes per byte of model text.
MEMORY_LIMIT_BYTES = 4 << 30

_HINT = ("retrain the model (SELECT * FROM lungsql.train_model(...)) or deploy an earlier one "
         "(SELECT lungsql.deploy(name, 'rollback')); a model text must be LightGBM's own output, unedited")
_MARKER = "lungsql-model-check: "
# Optional packages lightgbm imports when present; the check process needs none of them (about 0.2 s).
_NOT_NEEDED = ("pandas", "sklearn", "dask", "distributed", "matplotlib", "graphviz", "pyarrow", "polars",
               "cffi", "psutil")
_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_BOOTSTRAP = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
              "from lungsql.ml.model_check import _child_main; "
              "_child_main(int(sys.argv[2]), int(sys.argv[3]), len(sys.argv) > 4 and sys.argv[4] == 'many')")


class Malformed(ValueError):
    """The model text is not one LightGBM can be trusted to parse; the message says where."""


# ----------------------------------------------------------------------------- the text itself


@dataclass(frozen=True)
class Structure:
    """What the text declares: feature count (max_feature_idx + 1) and number of trees."""

    num_feature: int
    num_trees: int


_LEAF_ARRAYS = ("leaf_weight", "leaf_count")  # num_leaves values, when present
_NODE_ARRAYS = ("split_gain", "internal_value", "internal_weight", "internal_count")  # num_leaves - 1
_CATEGORICAL = 1  # bit of decision_type


def structure(text: str) -> Structure:
    """Check the layout of a LightGBM model text in Python; raise `Malformed` naming the first fault.

    Checks what LightGBM's parser and ``predict`` rely on without checking:
    the header numbers, one section per tree numbered from 0, ``tree_sizes``
    equal to the byte length of each section, every array of a tree as long
    as ``num_leaves`` says, child indices that form one binary tree from the
    root, split features below ``max_feature_idx + 1``, categorical splits
    within ``cat_boundaries``, and finite leaf values.
    """
    if "\x00" in text:
        raise Malformed("the text holds a NUL character, where LightGBM would stop reading")
    if text.count("\r") != text.count("\r\n"):
        raise Malformed("the text holds a carriage return that does not end a line")
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith("Tree=")), None)
    header = _header(lines[:start] if start is not None else lines)
    num_feature = _int(header, "max_feature_idx", "the header") + 1
    if num_feature < 1:
        raise Malformed(f"max_feature_idx is {num_feature - 1}")
    if _int(header, "num_class", "the header") != 1:
        raise Malformed(f"num_class is {header['num_class']}; a binary classifier has 1")
    if _int(header, "num_tree_per_iteration", "the header", default=1) != 1:
        raise Malformed(f"num_tree_per_iteration is {header['num_tree_per_iteration']}; a binary classifier has 1")
    if start is None:
        raise Malformed("the text has no trees (no line starts with 'Tree='): it is truncated")
    end = next((i for i in range(start, len(lines)) if lines[i].rstrip("\r") == "end of trees"), None)
    if end is None:
        raise Malformed("the text has no 'end of trees' line: it is truncated")
    sections: list[list[str]] = []
    for line in lines[start:end]:
        if line.startswith("Tree="):
            if line.rstrip("\r") != f"Tree={len(sections)}":
                raise Malformed(f"tree {len(sections)} starts with {line[:40]!r}")
            sections.append([line])
        else:
            sections[-1].append(line)
    if "tree_sizes" in header:
        sizes = _ints(header["tree_sizes"], "tree_sizes", "the header")
        actual = [sum(len(line.encode("utf-8")) + 1 for line in section) for section in sections]
        if len(sizes) != len(actual):
            raise Malformed(f"tree_sizes lists {len(sizes)} trees, the text holds {len(actual)}")
        for i, (size, length) in enumerate(zip(sizes, actual)):
            if size != length:
                raise Malformed(f"tree_sizes gives tree {i} {size} bytes, its section has {length}")
    for i, section in enumerate(sections):
        _tree(section[1:], f"tree {i}", num_feature)
    return Structure(num_feature, len(sections))


def _header(lines: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.rstrip("\r").partition("=")
        if sep:
            if key in values:
                raise Malformed(f"the header gives {key} twice")
            values[key] = value
    return values


def _tree(lines: list[str], where: str, num_feature: int) -> None:
    values: dict[str, str] = {}
    body = True
    for line in lines:
        line = line.rstrip("\r")
        if not line:
            body = False  # LightGBM stops reading a tree at its first empty line
            continue
        if not body:
            raise Malformed(f"{where} has a line after its blank line: {line[:40]!r}")
        key, sep, value = line.partition("=")
        if not sep:
            raise Malformed(f"{where} has a line without '=': {line[:40]!r}")
        if key in values:
            raise Malformed(f"{where} gives {key} twice")
        values[key] = value
    leaves = _int(values, "num_leaves", where)
    num_cat = _int(values, "num_cat", where)
    linear = _int(values, "is_linear", where, default=0) != 0
    if leaves < 1 or num_cat < 0:
        raise Malformed(f"{where} has num_leaves={leaves}, num_cat={num_cat}")
    leaf_values = _floats(values, "leaf_value", where, leaves)
    if not all(math.isfinite(v) for v in leaf_values):
        raise Malformed(f"{where} has a leaf value that is not a finite number")
    if leaves == 1 and not linear:
        return  # LightGBM reads nothing else of a one-leaf tree
    nodes = leaves - 1
    left = _ints(_need(values, "left_child", where), "left_child", where, nodes)
    right = _ints(_need(values, "right_child", where), "right_child", where, nodes)
    features = _ints(_need(values, "split_feature", where), "split_feature", where, nodes)
    thresholds = _tokens(_need(values, "threshold", where), "threshold", where, nodes)
    decisions = _ints(values["decision_type"], "decision_type", where, nodes) if "decision_type" in values \
        else [0] * nodes
    for key in _NODE_ARRAYS:
        if key in values:
            _tokens(values[key], key, where, nodes)
    for key in _LEAF_ARRAYS:
        if key in values:
            _tokens(values[key], key, where, leaves)
    bad = next((f for f in features if not 0 <= f < num_feature), None)
    if bad is not None:
        raise Malformed(f"{where} splits on feature {bad}; the model has {num_feature} features")
    _children(left, right, leaves, where)
    if num_cat:
        bounds = _ints(_need(values, "cat_boundaries", where), "cat_boundaries", where, num_cat + 1)
        if bounds[0] != 0 or any(b > a for b, a in zip(bounds, bounds[1:])):
            raise Malformed(f"{where} has cat_boundaries that do not rise from 0")
        _tokens(_need(values, "cat_threshold", where), "cat_threshold", where, bounds[-1])
    for node, decision in enumerate(decisions):
        if not -128 <= decision <= 127:
            raise Malformed(f"{where} has decision_type {decision} at node {node}")
        if decision & _CATEGORICAL:
            index = _number(thresholds[node], "threshold", where)
            if not (index.is_integer() and 0 <= index < num_cat):
                raise Malformed(f"{where}: categorical node {node} names category set {thresholds[node]!r} "
                                f"of {num_cat}")
    if linear and "num_features" in values:  # without it, LightGBM fits no leaf on features
        counts = _ints(values["num_features"], "num_features", where, leaves)
        if any(c < 0 for c in counts):
            raise Malformed(f"{where} has a negative count in num_features")
        total = sum(counts)
        if total:
            used = _ints(_need(values, "leaf_features", where), "leaf_features", where, total)
            _tokens(_need(values, "leaf_coeff", where), "leaf_coeff", where, total)
            bad = next((f for f in used if not 0 <= f < num_feature), None)
            if bad is not None:
                raise Malformed(f"{where} fits a leaf on feature {bad}; the model has {num_feature} features")
    if linear and "leaf_const" in values:
        _tokens(values["leaf_const"], "leaf_const", where, leaves)


def _children(left: list[int], right: list[int], leaves: int, where: str) -> None:
    """The nodes 0..leaves-2 and leaves ~0..~(leaves-1) form one binary tree rooted at node 0."""
    if leaves == 1:
        return  # a linear tree of one leaf: no nodes
    seen_nodes, seen_leaves = {0}, set()
    stack = [0]
    while stack:
        node = stack.pop()
        for child in (left[node], right[node]):
            if child >= 0:
                if child >= leaves - 1 or child in seen_nodes:
                    raise Malformed(f"{where}: node {node} has child {child}, which is "
                                    + ("not a node" if child >= leaves - 1 else "already in the tree"))
                seen_nodes.add(child)
                stack.append(child)
            else:
                leaf = ~child
                if leaf >= leaves or leaf in seen_leaves:
                    raise Malformed(f"{where}: node {node} has leaf {leaf}, which is "
                                    + ("not a leaf" if leaf >= leaves else "already in the tree"))
                seen_leaves.add(leaf)
    if len(seen_nodes) != leaves - 1 or len(seen_leaves) != leaves:
        raise Malformed(f"{where}: only {len(seen_nodes)} of {leaves - 1} nodes and {len(seen_leaves)} of "
                        f"{leaves} leaves hang from the root")


def _need(values: dict[str, str], key: str, where: str) -> str:
    if key not in values:
        raise Malformed(f"{where} has no {key}")
    return values[key]


def _int(values: dict[str, str], key: str, where: str, default: int | None = None) -> int:
    if key not in values and default is not None:
        return default
    (value,) = _ints(_need(values, key, where), key, where, 1)
    return value


def _tokens(value: str, key: str, where: str, count: int | None = None) -> list[str]:
    tokens = value.split()
    if count is not None and len(tokens) != count:
        raise Malformed(f"{where} has {len(tokens)} value(s) of {key}, {count} expected")
    return tokens


def _ints(value: str, key: str, where: str, count: int | None = None) -> list[int]:
    try:
        return [int(t) for t in _tokens(value, key, where, count)]
    except ValueError:
        raise Malformed(f"{where} has a {key} that is not a list of integers") from None


def _number(token: str, key: str, where: str) -> float:
    try:
        return float(token)
    except ValueError:
        raise Malformed(f"{where} has a {key} value {token[:20]!r} that is not a number") from None


def _floats(values: dict[str, str], key: str, where: str, count: int) -> list[float]:
    return [_number(t, key, where) for t in _tokens(_need(values, key, where), key, where, count)]


# ----------------------------------------------------------------------------- LightGBM, in a child process


def python_interpreter() -> str:
    """A Python of this process's major.minor to run the check in.

    Inside PostgreSQL ``sys.executable`` is the server binary or empty, so the
    interpreter is looked for in ``sys.base_prefix``/bin, then on PATH.
    """
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = []
    if sys.executable and os.path.basename(sys.executable).startswith("python"):
        candidates.append(sys.executable)
    candidates.append(os.path.join(sys.base_prefix or "/usr", "bin", version))
    candidates.append(shutil.which(version) or "")
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise ConfigurationError(
        f"lungsql checks a model in a separate {version} process before scoring with it, and finds no "
        f"{version} (looked for {', '.join(c for c in candidates if c) or 'nothing'}); nothing was scored",
        hint=f"install {version} where the server can run it (e.g. apt-get install {version})",
    )


def parse_in_child(data: bytes, timeout: float = CHECK_TIMEOUT_S, meanwhile: Callable[[], object] | None = None,
                   many: bool = False) -> tuple[dict | None, str | None]:
    """Parse the model text with LightGBM in a child process; (its report, None) or (None, why it failed).

    ``meanwhile`` is called while the child runs (`check` imports LightGBM
    here then, which takes about as long as the child).  A failure that says
    nothing about the text (no interpreter, the child cannot import LightGBM)
    raises `ConfigurationError` instead.
    """
    import lungsql

    paths = [str(Path(lungsql.__file__).resolve().parent.parent)] + [p for p in sys.path if p]
    memory = MEMORY_LIMIT_BYTES + 8 * len(data)
    command = [python_interpreter(), "-I", "-S", "-c", _BOOTSTRAP, json.dumps(paths), str(memory),
               str(max(1, math.ceil(timeout)))] + (["many"] if many else [])
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["done"] = subprocess.run(command, input=data, capture_output=True, timeout=timeout,
                                             close_fds=True, env={**os.environ, **_ENV},
                                             cwd="/" if os.name == "posix" else None)
        except BaseException as exc:  # handed to the calling thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="lungsql-model-check", daemon=True)
    worker.start()
    try:
        if meanwhile is not None:
            meanwhile()
    finally:
        worker.join()
    error = outcome.get("error")
    if isinstance(error, subprocess.TimeoutExpired):
        return None, f"the check process ran past {timeout:g} s"
    if isinstance(error, OSError):
        raise ConfigurationError(f"lungsql cannot start the process that checks a model: {error}; nothing was "
                                 "scored", hint="check that the server's OS user may run " + command[0])
    if error is not None:
        raise error
    done = outcome["done"]
    out = done.stdout.decode("utf-8", errors="replace")
    said = _last_fatal(out + "\n" + done.stderr.decode("utf-8", errors="replace"))
    if done.returncode < 0:
        name = _signal_name(-done.returncode)
        return None, f"the check process was killed by {name}" + (f" after LightGBM said {said!r}" if said else "")
    report = next((json.loads(line[len(_MARKER):]) for line in reversed(out.splitlines())
                   if line.startswith(_MARKER)), None)
    if report is None or not isinstance(report, dict):
        return None, f"the check process exited with status {done.returncode} without a report" + (
            f" after LightGBM said {said!r}" if said else "")
    if report.get("stage") == "import":
        raise ConfigurationError(
            f"the process that checks a model cannot import LightGBM: {report.get('error')}; nothing was scored",
            hint="run `lungsql check` and `lungsql init` again from the project's venv")
    if "error" in report:
        return None, str(report["error"])
    return report, None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _last_fatal(output: str) -> str | None:
    fatal = re.findall(r"\[LightGBM\] \[Fatal\] ([ -~]*)", output)  # printable: it may quote memory past the text
    return fatal[-1].strip()[:160] if fatal else None


def _child_main(memory: int, cpu_seconds: int, many: bool = False) -> None:
    """The check process: limits first, then parse stdin with LightGBM, score two rows, report one line
    (with `many`, stdin is a JSON list of texts and the line reports each in turn)."""
    try:
        import resource
    except ImportError:  # Windows (SQL Server Machine Learning Services): no rlimits
        resource = None
    if resource is not None:
        for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu_seconds),
                             (resource.RLIMIT_CORE, 0)):
            soft, hard = resource.getrlimit(limit)
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(limit, (value, hard))
    text = sys.stdin.buffer.read().decode("utf-8")
    for name in _NOT_NEEDED:
        sys.modules.setdefault(name, None)  # type: ignore[assignment]  # an ImportError if asked for
    try:
        import lightgbm
        import numpy as np
    except Exception as exc:
        print(_MARKER + json.dumps({"stage": "import", "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        sys.exit(3)
    def parsed(one: str) -> dict:
        try:
            booster = lightgbm.Booster(model_str=one)
            num_feature, num_trees = int(booster.num_feature()), int(booster.num_trees())
            booster.feature_name()  # as lungsql.ml.scoring.Model reads them
            rows = np.zeros((2, num_feature), dtype=np.float64)
            rows[1] = np.nan
            predictions = np.asarray(booster.predict(rows, num_threads=1), dtype=np.float64).reshape(-1)
            return {"num_feature": num_feature, "num_trees": num_trees,
                    "predictions": [float(p) for p in predictions]}
        except Exception as exc:  # LightGBMError, or json errors in the parameters section
            return {"stage": "parse", "error": " ".join(str(exc).split())[:300]}

    if many:
        print(_MARKER + json.dumps({"many": [parsed(one) for one in json.loads(text)]}), flush=True)
        return
    report = parsed(text)
    print(_MARKER + json.dumps(report), flush=True)
    if "error" in report:
        sys.exit(2)


# ----------------------------------------------------------------------------- once per model per process

_checked: set[str] = set()
_refused: dict[str, str] = {}
_lock = threading.Lock()


def check(data: bytes, sha256: str, name: str = "the model", timeout: float = CHECK_TIMEOUT_S,
          meanwhile: Callable[[], object] | None = None) -> None:
    """Raise `ConfigurationError` unless the model text `data` (whose SHA-256 the caller has verified)
    is safe to parse in this process.  Runs once per SHA-256 per process; a refusal is remembered too.
    ``meanwhile`` is called while the child process runs (see `parse_in_child`)."""
    with _lock:
        if sha256 in _checked:
            return
        why = _refused.get(sha256)
    if why is None:
        why, final = _verdict(data, timeout, meanwhile)
        with _lock:
            if why is None:
                _checked.add(sha256)
                return
            if final:
                _refused[sha256] = why
    raise ConfigurationError(f"LightGBM cannot read {name}: the model text is malformed ({why}); nothing was scored",
                             hint=_HINT)


def check_many(items: list[tuple[bytes, str, str]], timeout: float = CHECK_TIMEOUT_S) -> None:
    """`check` for several model texts (data, sha256, name) at once: the texts not checked yet are
    parsed by one child process (one start of Python and LightGBM instead of one per text: for a
    radiograph model's 14 boosters, about 0.5 s instead of 3.7 s). A text that fails there, or a
    child that dies, sends every text of the batch to `check` on its own, which says which and why."""
    with _lock:
        pending = [(data, sha, name) for data, sha, name in items if sha not in _checked]
    if not pending:
        return
    try:
        declared = [structure(data.decode("utf-8")) for data, _, _ in pending]
        texts = json.dumps([data.decode("utf-8") for data, _, _ in pending]).encode("utf-8")
    except (UnicodeDecodeError, Malformed):
        declared = None
    report, _ = parse_in_child(texts, timeout, many=True) if declared is not None else (None, None)
    found = report.get("many") if isinstance(report, dict) else None
    if isinstance(found, list) and len(found) == len(pending):
        for (data, sha, name), want, got in zip(pending, declared, found):
            fine = (isinstance(got, dict) and "error" not in got
                    and Structure(got.get("num_feature"), got.get("num_trees")) == want
                    and all(0.0 <= p <= 1.0 for p in got.get("predictions", [-1])))
            if fine:
                with _lock:
                    _checked.add(sha)
    for data, sha, name in pending:  # what the batch did not clear, one at a time (raises for a bad one)
        check(data, sha, name, timeout)


def _verdict(data: bytes, timeout: float, meanwhile: Callable[[], object] | None) -> tuple[str | None, bool]:
    """(why the text is refused, or None; whether that answer is final rather than a timeout)."""
    try:
        declared = structure(data.decode("utf-8"))
    except UnicodeDecodeError:
        return "it is not UTF-8 text", True
    except Malformed as exc:
        return str(exc), True
    report, why = parse_in_child(data, timeout, meanwhile)
    if report is None:
        return why, not str(why).startswith("the check process ran past")
    found = Structure(report["num_feature"], report["num_trees"])
    if found != declared:
        return (f"LightGBM reads {found.num_trees} trees over {found.num_feature} features, the text declares "
                f"{declared.num_trees} over {declared.num_feature}"), True
    if not all(0.0 <= p <= 1.0 for p in report["predictions"]):
        return f"it predicts {report['predictions']} for rows of zeros and of missing values", True
    return None, True


def checked_clear() -> None:
    """Forget which models this process has checked (the next `check` of each runs again)."""
    with _lock:
        _checked.clear()
        _refused.clear()
