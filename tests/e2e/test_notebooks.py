"""The quickstart notebook runs top to bottom on the default model (nbclient)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.e2e
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def test_quickstart_notebook_executes(tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    os.environ.setdefault("THAW_AGENTS_STORE", str(tmp_path / "store"))
    # The venv's own "python3" kernel (ipykernel installs it under sys.prefix) runs the cells.
    os.environ["JUPYTER_PATH"] = str(Path(sys.prefix) / "share" / "jupyter")
    client = NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    assert "from snapshot" in outputs and "mean TTFT" in outputs
    assert any("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", [])), (
        "the TTFT plot was not drawn"
    )
