"""The Jupyter tutorials in ``tutorials/``: each runs top to bottom, and none is committed with outputs.

Each notebook runs in a fresh IPython kernel of *this* interpreter (not whatever ``python3``
kernelspec the machine has), with a per-cell timeout; any cell error fails the test and names
the cell. The tests are marked ``tutorial`` and run after all others (``conftest.py``), so the
export/compile cache the other tests filled is warm. ``-m "not tutorial"`` skips them.
"""

import re
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds, per cell (a cold cache exports and compiles inside one cell)


def _this_interpreter_kernel_manager():
    from ipykernel.kernelspec import get_kernel_dict
    from jupyter_client import AsyncKernelManager
    from jupyter_client.kernelspec import KernelSpec

    class ThisInterpreter(AsyncKernelManager):
        """A kernel of ``sys.executable`` (the venv running pytest), whatever kernelspecs exist."""

        @property
        def kernel_spec(self):
            spec = get_kernel_dict()
            assert spec["argv"][0] == sys.executable
            return KernelSpec(resource_dir="", argv=spec["argv"], display_name=spec["display_name"],
                              language=spec["language"])

    return ThisInterpreter


def test_every_tutorial_is_committed_without_outputs():
    assert NOTEBOOKS, f"no notebooks in {TUTORIALS}"
    for path in NOTEBOOKS:
        nb = nbformat.read(str(path), as_version=4)
        nbformat.validate(nb)
        dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
                 and (cell.get("outputs") or cell.get("execution_count") is not None)]
        assert not dirty, (f"{path.name}: cells {dirty} have outputs; strip them before committing "
                           "(e.g. jupyter nbconvert --clear-output --inplace)")


def test_readme_links_every_tutorial():
    readme = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"\(tutorials/([\w.-]+\.ipynb)\)", readme))
    assert linked == {p.name for p in NOTEBOOKS}


@pytest.mark.slow
@pytest.mark.tutorial
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs_top_to_bottom(path, tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            kernel_manager_class=_this_interpreter_kernel_manager(),
                            resources={"metadata": {"path": str(tmp_path)}})  # files go to tmp
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError (the cell's source and traceback) on any error
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s")
    ran = [c for c in nb.cells if c.cell_type == "code"]
    assert ran and all(c.execution_count for c in ran)
