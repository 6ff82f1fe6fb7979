"""``tvm_lite.inspect_cache``: with frozen modules in ``inspect``'s file cache, the frames
``inspect.stack()`` returns inside an import are the same, and naming a frozen frame's module
no longer scans ``sys.modules`` (TVMScript calls ``inspect.stack()`` per parsed function)."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = r"""
import inspect, json, sys
sys.path.insert(0, sys.argv[1])
seed = sys.argv[2] == "seed"
if seed:
    from tvm_lite.inspect_cache import seed_frozen_modules
    seed_frozen_modules()
scans = []
absfile = inspect.getabsfile
inspect.getabsfile = lambda obj, _filename=None: scans.append(_filename) or absfile(obj, _filename)
import stacked  # its body calls inspect.stack() while Python's import machinery is on the stack
frames = [(f.filename, f.lineno, f.function, f.code_context) for f in stacked.FRAMES]
print(json.dumps({"frames": frames,
                  "frozen_scans": sum(str(s).startswith("<frozen") for s in scans)}))
"""


def _probe(tmp_path, mode: str) -> dict:
    (tmp_path / "stacked.py").write_text("import inspect\nFRAMES = inspect.stack()\n")
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), mode], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def test_frozen_frames_resolve_without_a_scan_and_the_stack_is_unchanged(tmp_path):
    plain, seeded = _probe(tmp_path, "plain"), _probe(tmp_path, "seed")
    frozen = [f for f in plain["frames"] if f[0].startswith("<frozen importlib._bootstrap")]
    assert frozen, plain["frames"]  # the import machinery's frames are there
    assert plain["frozen_scans"] >= len(frozen)  # each one looked up the hard way
    assert seeded["frozen_scans"] == 0
    assert seeded["frames"] == plain["frames"]
