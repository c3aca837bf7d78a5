"""The teaching notebooks in notebooks/ run top to bottom on the CPU and are committed without outputs.

They are executed in memory with nbclient, in a kernel on this interpreter (the project's venv);
nothing is written back to the files.
"""

import json
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ["01_forward_process.ipynb", "02_sampling.ipynb"]
# Each notebook takes well under a minute on 2 CPU cores; no single cell may take 2 minutes.
CELL_TIMEOUT_S = 120
KERNEL_NAME = "ddpm-lightning-test"


def test_the_notebook_list_is_complete():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    assert "widgets" not in nb.metadata


@pytest.fixture
def kernel_manager(tmp_path):
    """A kernel on this interpreter, whatever kernelspecs the machine has installed."""
    spec_dir = tmp_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": KERNEL_NAME,
        "language": "python",
    }))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, kernel_manager):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = NotebookClient(
        nb, km=kernel_manager, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    # The figures are the point of the notebooks: each plt.show() must have produced an image.
    figures = sum("image/png" in out.get("data", {}) for out in outputs)
    shows = sum(cell.source.count("plt.show()") for cell in nb.cells if cell.cell_type == "code")
    assert figures == shows > 0
