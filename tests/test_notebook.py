"""launch/colab_sampling.ipynb runs top to bottom on tiny random assets (convert, sample, decode, show)."""

import importlib.util
import os
import re

import pytest

from tests import REPO
NOTEBOOK = REPO / "launch" / "colab_sampling.ipynb"
SAMPLERS = ("euler_pf", "dual_loop", "look_ahead")


def _text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    return str(output.get("data", {}).get("text/plain", ""))


@pytest.mark.slow
def test_notebook_runs_on_tiny_assets(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        pytest.skip("no 'python3' Jupyter kernel spec (ipykernel not installed)")

    from tests import tiny_assets

    assets = tmp_path / "assets"
    tiny_assets.write_assets(assets)

    # The kernel inherits this process's environment: the tiny switch, the repo on the path, and
    # one CPU device (conftest's 8 fake devices are not wanted here).
    xla_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                         if not f.startswith("--xla_force_host_platform_device_count"))
    kernel_env = {
        "PF_NOTEBOOK_TINY": "1", "PF_NOTEBOOK_ASSETS": str(assets), "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": xla_flags,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    saved = {k: os.environ.get(k) for k in kernel_env}
    os.environ.update(kernel_env)
    try:
        nb = nbformat.read(NOTEBOOK, as_version=4)
        client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                         resources={"metadata": {"path": str(REPO)}})
        client.execute()  # raises CellExecutionError on the first failing cell
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(_text(o) for o in outputs)
    # The conversion cell ran the real converter on the release-format file.
    assert (assets / "work" / "pft-tiny_random_jax" / "config.json").exists()
    assert "wrote " in text and "parameters" in text

    # Every sampler ran within the tiny budget of 8 model calls (the notebook itself asserts that
    # info['nfe'] equals samplers.expected_nfe); euler_pf and dual_loop use it exactly.
    nfe = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+) +NFE (\d+) \(", text, re.M)}
    assert set(nfe) == set(SAMPLERS), text
    assert nfe["euler_pf"] == nfe["dual_loop"] == 8 and 6 <= nfe["look_ahead"] <= 8, nfe
    pngs = [o for o in outputs if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
    by_cell = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outs = cell.get("outputs", [])
        n_png = sum(1 for o in outs if o.get("output_type") == "display_data" and "image/png" in o.get("data", {}))
        if n_png:
            by_cell.append((n_png, "".join(_text(o) for o in outs)))
    # Two picture cells (grids, difficulty), one picture per sampler in each, titled with its name.
    assert len(by_cell) == 2, by_cell
    for n_png, cell_text in by_cell:
        assert n_png == len(SAMPLERS)
        if importlib.util.find_spec("matplotlib") is None:  # the PIL fallback prints each title
            for name in SAMPLERS:
                assert name in cell_text
    assert len(pngs) == 2 * len(SAMPLERS)
