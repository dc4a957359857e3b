"""The notebooks of colab/: each jupytext pair (reviewed source ``.py`` and ``.ipynb``) is in sync with outputs
stripped, and each notebook runs top to bottom on the CPU at tiny sizes (``DIFFJAX_SMOKE=1``) on 2 simulated
devices, ending with its own assertions."""

import os
import time

import pytest

from conftest import ROOT

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

COLAB = os.path.join(ROOT, "colab")
NOTEBOOKS = sorted(f[:-3] for f in os.listdir(COLAB) if f.endswith(".py"))


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_there_are_notebooks():
    assert {"quickstart", "functional_api", "your_images"} <= set(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_pair_is_in_sync_and_outputs_are_stripped(name):
    source = jupytext.read(os.path.join(COLAB, name + ".py"))
    path = os.path.join(COLAB, name + ".ipynb")
    assert os.path.isfile(path), f"{path} is missing: run `jupytext --sync colab/{name}.py`"
    notebook = jupytext.read(path)
    assert _cells(notebook) == _cells(source), (f"colab/{name}.ipynb and colab/{name}.py differ: edit the .py and "
                                                f"run `jupytext --sync colab/{name}.py`")
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{name}.ipynb has outputs"


@pytest.mark.process("each notebook runs in a Jupyter kernel of its own")
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch, subprocess_env):
    notebook = jupytext.read(os.path.join(COLAB, name + ".ipynb"))
    env = subprocess_env(devices=2)
    env.update(DIFFJAX_SMOKE="1", DIFFJAX_NOTEBOOK_WORKDIR=str(tmp_path), MPLBACKEND="Agg")
    for key, value in env.items():  # the kernel inherits this process's environment
        monkeypatch.setenv(key, value)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": ROOT}})
    start = time.perf_counter()
    client.execute()
    print(f"colab/{name}.ipynb ran in {time.perf_counter() - start:.0f} s")
    last = [c for c in notebook.cells if c.cell_type == "code"][-1]
    text = "".join(o.get("text", "") for o in last.get("outputs", []))
    assert "all checks passed" in text, text
