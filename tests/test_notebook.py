"""examples/quickstart.ipynb: committed without outputs, and executed end to end so it cannot rot."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from conftest import REAL_DATA

NOTEBOOK = Path(__file__).parents[1] / "examples" / "quickstart.ipynb"


def _outputs(cell: nbformat.NotebookNode) -> set[str]:
    """The MIME types (and stream names) a code cell produced."""
    kinds: set[str] = set()
    for out in cell.get("outputs", []):
        kinds |= set(out.get("data", {})) if "data" in out else {out.get("name", out["output_type"])}
    return kinds


def test_committed_notebook_is_valid_and_has_no_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert "widgets" not in nb.metadata  # no saved widget state either
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="the covid19 dataset is not available")
def test_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient import NotebookClient

    monkeypatch.setenv("LUNGXRAY_DATA", str(REAL_DATA.resolve()))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source += f"\nRUN_DIR = {str(tmp_path / 'quickstart')!r}  # injected by the test"
    # Executed from examples/, as a user opening it in Jupyter would; a failing cell raises CellExecutionError.
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}},
                   ).execute()

    assert (tmp_path / "quickstart" / "meta.json").is_file()
    cells = {c.source.splitlines()[0]: c for c in nb.cells if c.cell_type == "code"}
    train = next(c for first, c in cells.items() if first.startswith("run = lungxray.train"))
    assert "application/vnd.jupyter.widget-view+json" in _outputs(train)  # the notebook progress bar
    assert "text/html" in _outputs(train)
    html = next(o.data["text/html"] for o in train.outputs if "text/html" in o.get("data", {}))
    assert "lungxray run smoke" in html and "test (66 images)" in html and "macro F1" in html
    plots = [c for c in nb.cells if c.cell_type == "code" and "plt.show()" in c.source]
    assert len(plots) == 3 and all("image/png" in _outputs(c) for c in plots)  # curves, confusion, overlays
    predict = next(c for first, c in cells.items() if first.startswith("model = lungxray.load"))
    table = next(o.data["text/html"] for o in predict.outputs if "text/html" in o.get("data", {}))
    assert table.count("<tr") == 7 and "prob_pneumonia" in table  # header + two images per class
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
