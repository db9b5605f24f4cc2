"""README and notebook: what a new user follows on day one is complete and self-contained."""

import json
import re
import shlex
import tomllib

from tests import REPO

README = (REPO / "README.md").read_text()
NOTEBOOK = json.loads((REPO / "launch" / "colab_sampling.ipynb").read_text())
NB_CODE = "\n".join("".join(c["source"]) for c in NOTEBOOK["cells"] if c["cell_type"] == "code")
PLACEHOLDER = re.compile(r"CHANGE-?ME|your[-_]?(org|user|name)|example\.(com|org)|<[A-Z_ ]+>", re.I)


def test_readme_has_the_cluster_sections_versions_and_install_lines():
    for section in ("## Install", "## Run on Cloud TPU", "## Run on a GPU node", "## Evaluate on ImageNet"):
        assert section in README, section
    for needle in ("Python >= 3.11", 'jax[cuda12]', 'jax[tpu]', "requirements-convert.txt",
                   "launch/tpu_pod.sh", "launch/gpu_node.sh", "launch/slurm_example.sbatch",
                   "VIRTUAL_imagenet256_labeled.npz", "pt_inception-2015-12-05-6726825d.pth", "--multihost"):
        assert needle in README, needle


def test_no_paths_that_exist_only_beside_this_repository():
    texts = {"README.md": README, "notebook": NB_CODE}
    texts.update({p.name: p.read_text() for p in (REPO / "configs").glob("*.py")})
    texts.update({p.name: p.read_text() for p in (REPO / "launch").iterdir() if p.suffix in (".sh", ".sbatch")})
    for name, text in texts.items():
        assert "../shared" not in text and "/work/" not in text, name


def _commands(text):
    """Every `python -m patch_forcing.main ...` command, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", text)
    found = [m.group(0) for m in re.finditer(r"python -m patch_forcing\.main[^\n`]*", text)]
    return [c for c in found if " --" in c]  # not the bare module name in prose


def test_every_main_command_is_complete():
    commands = _commands(README) + _commands("\n".join("".join(c["source"]) for c in NOTEBOOK["cells"]))
    assert len(commands) >= 6
    for cmd in commands:
        words = shlex.split(cmd.replace("<converted dir>", "DIR"))
        assert any(w.startswith("--config=") for w in words), cmd
        assert any(w.startswith("--workdir=") for w in words), cmd


def test_notebook_clones_the_repository_named_in_the_package_metadata():
    url = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url) and not PLACEHOLDER.search(url), url
    (line,) = [line for line in NB_CODE.splitlines() if line.startswith("REPO_URL =")]
    assert line.split("#")[0].split("=", 1)[1].strip() == repr(url).replace("'", '"')
    assert not PLACEHOLDER.search(NB_CODE)
