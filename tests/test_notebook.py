"""The example notebook runs end to end (on the toy model) and reaches its own assertion."""

from __future__ import annotations

import nbformat
from nbclient import NotebookClient

from .conftest import REPO


def test_notebook_executes(tmp_path):
    notebook = nbformat.read(REPO / "examples" / "sande_toy.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "| after SANDE | 0.0% |" in outputs
