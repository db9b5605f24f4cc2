"""The captioned-digits task end to end through the command line: train from main, sample from a
prompt and from a prompts file, and score the samples against their prompts."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from patch_forcing.data import captioned
from patch_forcing.evaluation import prompt_accuracy as pa
from tests import REPO

# A short run of a small model: enough to learn each half's colour and size from the prompt,
# not the digits (those take the full run; benchmarks/results/t2i_digits.md). The smoke preset's
# 4 x 4 patches (48 values per token) with width 64: tokens wider than their patch, so the model
# can pass each pixel through. (8 x 8 patches at width 64, 192 values per token, plateaued at the
# constant-velocity loss and never read the prompt in 400 steps.) The mostly black canvases make
# the first ~100-150 steps fit the mean velocity only; the text is read after that.
TRAIN = ["--config.train.num_steps=STEPS", "--config.optim.lr=LR", "--config.optim.warmup_steps=20",
         "--config.data.batch_size=32", "--config.ema.decay=0.9",
         "--config.model.hidden_dim=64", "--config.log.every_steps=50", "--config.log.eval_every_steps=1000",
         "--config.log.sample_every_steps=1000", "--config.checkpoint.every_steps=1000"]
MARGIN = 0.2  # layout accuracy (colours and sizes of both halves, in order) over the shuffled control


def _main(workdir, *flags):
    cmd = [sys.executable, "-m", "patch_forcing.main", "--config=configs/t2i.py:digits,smoke",
           f"--workdir={workdir}", *flags]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    if "--mode=sample" in flags:  # a few sampler calls: XLA's optimisation passes cost more than they save
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_digits_task_trains_samples_from_prompts_and_follows_them(tmp_path):
    steps, lr = 450, 3e-3
    flags = [f.replace("STEPS", str(steps)).replace("LR", str(lr)) for f in TRAIN]
    _main(tmp_path, *flags)
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [ln["loss"] for ln in lines if "loss" in ln]
    assert losses[-1] < 0.5 * losses[0]
    meta = json.loads((tmp_path / "inference" / "config.json").read_text())
    assert meta["family"] == "t2i" and meta["conditioning"]["kind"] == "text" and meta["step"] == steps

    prompt = "a small red 3 left of a large blue 7"
    _main(tmp_path, *flags, "--mode=sample", f"--config.sample.prompt={prompt}", "--config.sampler.steps=10")
    out = tmp_path / "samples" / "euler_pf-s10-cfg3.0"
    assert (out / "prompt_grid.png").exists() and (out / "difficulty.png").exists()
    assert list(np.load(out / "samples.npz")["prompts"]) == [prompt] * 4

    real, attrs, prompts = pa.real_canvases("test", 0, 48)
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    _main(tmp_path, *flags, "--mode=sample", f"--config.sample.prompts_file={tmp_path / 'prompts.txt'}",
          "--config.sample.images_per_prompt=1", "--config.sample.batch_size=48", "--config.sampler.steps=10")
    samples = np.load(out / "samples.npz")
    np.testing.assert_array_equal(np.stack([captioned.parse(str(p)) for p in samples["prompts"]]), attrs)
    fnet = pa.region_classifier(str(tmp_path / "classifier"), steps=100, num_train=1000, num_test=200)
    assert pa.scores(pa.classify(fnet, real)["attrs"], attrs)["layout_accuracy"] > 0.9  # the reader works
    read = pa.classify(fnet, samples["arr_0"])["attrs"]
    got, control = pa.scores(read, attrs), pa.scores(read, pa.shuffled(attrs))
    assert got["layout_accuracy"] > control["layout_accuracy"] + MARGIN, (got, control)
