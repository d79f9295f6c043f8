"""Every notebook in notebooks/ executes top to bottom without error (in this venv's
kernel). A notebook's cell tagged "parameters" sets its sizes; as papermill does, the test
injects a cell after it that makes the run small. They run with the slow tests (a kernel
start and a compile each); `make test` checks their parameter cells."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).parent.parent / "notebooks"
# Overrides injected after each notebook's parameters cell.
SMALL = {
    "quickstart": "STEPS = 12",
    "mod_squad": "STEPS = 12",
    "add_tasks": "SEEN_STEPS = 12\nADD_STEPS = 6\nSHOTS = 20",
    "evolution": 'TASKS = "iris, wine"\nGENERATIONS = 1\nCHILDREN = 2\nSTEPS = 8',
}
CASES = [
    pytest.param(path, marks=[pytest.mark.slow], id=path.name)
    for path in sorted(NOTEBOOKS.glob("*.ipynb"))
]


def with_parameters(notebook, source: str):
    """The notebook with `source` as a new cell after its "parameters" cell."""
    index = next(
        i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])
    )
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source))
    return notebook


def test_every_training_notebook_has_parameters_and_small_overrides():
    trained = {p.stem for p in NOTEBOOKS.glob("*.ipynb")} - {"moe_tour"}
    assert trained == set(SMALL)
    for name in SMALL:
        notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        tags = [cell.metadata.get("tags", []) for cell in notebook.cells]
        assert sum("parameters" in t for t in tags) == 1, name
        assert "google.colab" in notebook.cells[1].source  # the Colab-ready setup cell


@pytest.mark.parametrize("path", CASES)
def test_notebook_runs(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    if path.stem in SMALL:
        notebook = with_parameters(notebook, SMALL[path.stem])
    client = NotebookClient(
        notebook,
        timeout=600,
        startup_timeout=300,  # a busy machine starts a kernel slowly; 60 s is the default
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    errors = [
        o
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
