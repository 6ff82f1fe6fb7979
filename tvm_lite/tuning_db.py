"""A MetaSchedule tuning database as a build reads it (``tvm-lite tune`` writes it:
``tvm_lite/tune.py``): its check, its digest (part of an artifact's cache key), and the records a
build applies, those that measured faster than tvm_lite's own rules.

Part of the compiler core: imports neither the tuning session nor RPC.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import tvm_ffi

from .atomic import atomic_write_text
from .errors import UserError

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
RULES = "tvm_lite_rules.json"  # structural hash of a kernel -> its run time (s) with tvm_lite's rules
_FAILED = 1e9  # MetaSchedule stores 1e10 s for a candidate that failed


@tvm_ffi.register_error  # keeps its type when raised inside the pipeline (ApplyTuningDatabase)
class TuningError(UserError):
    """Bad tuning input (kernel names, database, budget); the message names it."""


def check_database(path) -> Path:
    """``path`` if it holds a MetaSchedule JSON database; a clear error otherwise. A last line
    cut short (a tuning run killed while it appended a record) is dropped, so the database stays
    usable; any other line that is not JSON is an error naming the file and line."""
    path = Path(path)
    missing = [f for f in (WORKLOADS, RECORDS) if not (path / f).exists()]
    if missing:
        raise TuningError(f"no MetaSchedule database in {path} (missing {', '.join(missing)}); "
                          "create one with `tvm-lite tune`")
    for name in (WORKLOADS, RECORDS):
        _check_json_lines(path / name)
    return path


def _check_json_lines(file: Path) -> None:
    text = file.read_text(errors="replace")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError as err:
            if i == len(lines) - 1 and not text.endswith("\n"):  # cut short while appended
                atomic_write_text(file, "".join(ln + "\n" for ln in lines[:-1]))
                return
            raise TuningError(f"corrupt tuning database {file}, line {i + 1}: {err}; delete the "
                              "line (or the database) and tune again") from err


def check_database_matches(path, db) -> None:
    """Called when a build applied no kernel of the database at ``path`` (``db``: its records that
    beat the rules): an error if it has records at all, for then none is a kernel of this build."""
    records = db.get_all_tuning_records()
    if records:
        names = sorted({_func_name(r.workload.mod) for r in records})
        raise TuningError(
            f"the tuning database {path} has {len(names)} tuned kernel(s) ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}), none of them a kernel of this build: it was "
            "tuned for another model or with other options (--kv-cache, --quant, target); tune "
            "this model with `tvm-lite tune`, or build without --tuning-db")


def database_digest(path) -> str:
    h = hashlib.sha256()
    for name in (WORKLOADS, RECORDS, RULES):
        if name == RULES and not (Path(path) / name).exists():
            continue
        h.update((Path(path) / name).read_bytes())
    return h.hexdigest()[:16]


def _kernel_key(mod) -> str:
    return str(tvm_ffi.structural_hash(mod))


def record_rules_time(path, mod, seconds: float) -> None:
    """Keep the run time of ``mod`` as tvm_lite's rules schedule it next to the database."""
    file = Path(path) / RULES
    times = json.loads(file.read_text()) if file.exists() else {}
    times[_kernel_key(mod)] = seconds
    atomic_write_text(file, json.dumps(times, indent=1, sort_keys=True))


def records_faster_than_rules(path, skipped: list | None = None):
    """An in-memory copy of the database at ``path`` without the kernels whose best record is not
    faster than tvm_lite's rules measured in the same session (kernels without a rules time keep
    their records). ``skipped`` receives the workloads' function names that were left out."""
    from tvm.s_tir import meta_schedule as ms

    file = Path(path) / RULES
    rules = json.loads(file.read_text()) if file.exists() else {}
    src = ms.database.JSONDatabase(work_dir=str(path), allow_missing=False,
                                   module_equality="structural")
    out = ms.database.MemoryDatabase(module_equality="structural")
    by_workload = {}
    for rec in src.get_all_tuning_records():
        by_workload.setdefault(_kernel_key(rec.workload.mod), []).append(rec)
    for key, records in by_workload.items():
        valid = [r for r in records if r.run_secs and float(r.run_secs[0]) < _FAILED]
        best = min((sum(float(t) for t in r.run_secs) / len(r.run_secs) for r in valid),
                   default=None)
        if best is None or (key in rules and best >= rules[key]):
            if skipped is not None:
                skipped.append(_func_name(records[0].workload.mod))
            continue
        workload = out.commit_workload(records[0].workload.mod)
        for r in valid:
            out.commit_tuning_record(ms.database.TuningRecord(
                r.trace, workload, r.run_secs, r.target, r.args_info))
    return out


def _func_name(mod) -> str:
    names = [gv.name_hint for gv in mod.get_global_vars()]
    func = mod[names[0]]
    return str(func.attrs.get("global_symbol", names[0])) if func.attrs else names[0]


def open_database(path):
    from tvm.s_tir import meta_schedule as ms

    Path(path).mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(path), module_equality="structural")


def measured(db, mod) -> list[float]:
    """Run times (s) of the valid records ``db`` holds for the kernel ``mod``, best first."""
    if not db.has_workload(mod):
        return []
    workload = db.commit_workload(mod)
    return [float(sum(float(s) for s in r.run_secs) / len(r.run_secs))
            for r in db.get_top_k(workload, 1 << 30)
            if r.run_secs and float(r.run_secs[0]) < _FAILED]
