"""Tests, laid out like the package (tests/flow, tests/models, ...); paths they share."""

import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist"  # the real MNIST test split, beside the repo
