"""The study runner: every variant x seed is an ordinary training run in
<workdir>/runs/<variant>-seed<k> (train.train_and_evaluate, which resumes from its checkpoints),
scored by one FID protocol shared by the whole workdir (evaluation/: one classifier, one reference
of all `study.reference_split` images, the same N for samples and for the noise-floor row of real
held-out images).

What a reader must know: nothing finished is redone. A run is finished when its inference
checkpoint holds the final step, an evaluation when its JSON exists under the same protocol, so a
killed study resumes where it stopped; studies sharing a workdir share runs (the samplers study
reuses the timesteps study's LTG and SiT models). A run whose training fields differ from the ones
recorded in its folder is refused, never mixed in.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from patch_forcing import checkpoint, config_lib, pictures, train
from patch_forcing.data import pipeline
from patch_forcing.evaluation import features, fid, metrics, reference
from patch_forcing.flow import samplers
from patch_forcing.models import classifier

TRAINING_FIELDS = ("seed", "data", "model", "flow", "loss", "optim", "ema", "train")
FID_METRICS = ("fid", "precision", "recall", "sfid", "is")


@dataclasses.dataclass(frozen=True)
class Variant:
    """A named change of the config: flat 'block.field' -> value."""

    name: str
    label: str
    overrides: dict

    @property
    def per_patch(self) -> bool:
        return bool(self.overrides.get("model.per_patch", True))


# ----------------------------------------------------------------------------- settings
def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_study(s) -> None:
    """The `study` block (configs/common.py study_block): one-line ValueError naming the field."""
    def ints(v, low):
        return all(isinstance(x, (int, np.integer)) and x >= low for x in v)

    for field, low in (("seeds", 1), ("train_steps", 0), ("num_samples", 2), ("batch_size", 1), ("nfe", 1),
                       ("n_inner", 1), ("num_examples", 1)):
        _require(ints([s[field]], low), f"config.study.{field}={s[field]!r} must be an int >= {low}")
    _require(len(s.budgets) > 0 and ints(s.budgets, 1),
             f"config.study.budgets={s.budgets!r} must be a non-empty tuple of ints >= 1")
    for field in ("difficulty_times", "context_times"):
        _require(len(s[field]) > 0 and all(0 < float(t) < 1 for t in s[field]),
                 f"config.study.{field}={s[field]!r} must be a non-empty tuple of times in (0, 1)")
    _require(len(s.context_ratios) > 0 and all(float(r) > 1 for r in s.context_ratios),
             f"config.study.context_ratios={s.context_ratios!r} must be a non-empty tuple of numbers > 1")


def copy_config(config) -> ml_collections.ConfigDict:
    """An unlocked deep copy (config_flags hands out locked configs)."""
    c = copy.deepcopy(config)
    c.unlock()
    return c


def set_field(config, dotted: str, value) -> None:
    *blocks, field = dotted.split(".")
    node = config
    for b in blocks:
        node = node[b]
    node[field] = value


def summarize(values) -> dict:
    """mean, std (sample std, ddof 1; None for one value) and the values; NaNs are dropped."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return {"mean": float(np.mean(vals)), "std": std, "n": len(vals), "values": vals}


def compare(a: dict, b: dict) -> str:
    """'lower' / 'higher' when a's mean +- std interval lies below / above b's, else 'not distinguishable'
    (also with fewer than two seeds, when the spread is unknown)."""
    if a["mean"] is None or b["mean"] is None or a["std"] is None or b["std"] is None:
        return "not distinguishable"
    if abs(a["mean"] - b["mean"]) <= a["std"] + b["std"]:
        return "not distinguishable"
    return "lower" if a["mean"] < b["mean"] else "higher"


def machine() -> dict:
    """The device and the host, named for the report (load average: the host is shared)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    d = jax.devices()[0]
    return dict(device=f"{d.platform} {d.device_kind}", devices=jax.device_count(), cpu=cpu,
                cpu_count=os.cpu_count(), load_average=[round(x, 2) for x in os.getloadavg()],
                jax=jax.__version__)


# ----------------------------------------------------------------------------- the study
class Study:
    """Runs, evaluations and the FID protocol of one workdir; every method skips finished work."""

    def __init__(self, config, workdir: str, seeds: int | None = None):
        self.config = copy_config(config)
        check_study(self.config.study)
        self.workdir = epath.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        s = self.config.study
        self.seeds = tuple(range(int(seeds or s.seeds)))
        self.train_steps = int(s.train_steps or self.config.train.num_steps)
        self._protocol = None

    # ------------------------------------------------------------------ bookkeeping
    def log_time(self, study: str, what: str, seconds: float) -> None:
        """Append to <workdir>/ledger.jsonl: the wall time of every run and evaluation, so a
        study interrupted and resumed still reports its total."""
        with (self.workdir / "ledger.jsonl").open("a") as f:
            row = {"study": study, "what": what, "seconds": round(seconds, 2), "time": time.time()}
            f.write(json.dumps(row) + "\n")

    def seconds(self, study: str | None = None) -> float:
        path = self.workdir / "ledger.jsonl"
        if not path.exists():
            return 0.0
        rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        return float(sum(r["seconds"] for r in rows if study is None or r["study"] == study))

    # ------------------------------------------------------------------ runs
    def run_dir(self, variant: Variant, seed: int) -> epath.Path:
        return self.workdir / "runs" / f"{variant.name}-seed{seed}"

    def run_config(self, variant: Variant, seed: int):
        """The config of one run: the study's config, the variant's fields, the seed and length."""
        c = copy_config(self.config)
        for k, v in variant.overrides.items():
            set_field(c, k, v)
        c.seed, c.train.num_steps = int(seed), self.train_steps
        c.eval.fid_every_steps = 0
        c.sampler.cfg_scale = 1.0
        return c

    def train(self, variant: Variant, seed: int, study: str) -> epath.Path:
        """Train the run unless its inference checkpoint already holds the final step."""
        run, c = self.run_dir(variant, seed), self.run_config(variant, seed)
        fields = json.loads(json.dumps({k: c[k].to_dict() if hasattr(c[k], "to_dict") else c[k]
                                        for k in TRAINING_FIELDS}, default=list))
        record = run / "study_run.json"
        if record.exists():
            old = json.loads(record.read_text())["training"]
            diff = sorted(k for k in TRAINING_FIELDS if old.get(k) != fields.get(k))
            _require(not diff, f"{run} was trained with other {diff} fields than this study's config asks for; "
                               "use another --workdir")
        else:
            run.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"variant": variant.name, "seed": seed, "training": fields}, indent=2))
        if self.finished(run):
            return run
        t0 = time.time()
        logging.info("study run %s: training %d steps", run.name, self.train_steps)
        train.train_and_evaluate(c, str(run))
        self.log_time(study, f"train {run.name}", time.time() - t0)
        return run

    def finished(self, run: epath.Path) -> bool:
        meta = run / "inference" / "config.json"
        return checkpoint.is_inference_checkpoint(run / "inference") and (
            json.loads(meta.read_text()).get("step") == self.train_steps)

    def load_model(self, variant: Variant, seed: int, study: str):
        """(DiTConfig, apply(params, x, t, y), params) of a trained run."""
        mcfg, apply_fn, params, _ = checkpoint.load_model(self.train(variant, seed, study) / "inference")
        return mcfg, apply_fn, params

    # ------------------------------------------------------------------ the FID protocol
    def protocol(self) -> dict:
        """The classifier (trained once into <workdir>/classifier), the reference statistics of
        all `study.reference_split` images, and N = min(study.num_samples, held-out images)."""
        if self._protocol is not None:
            return self._protocol
        c, s = self.config, self.config.study
        cls_dir = self.workdir / "classifier"
        if not classifier.exists(str(cls_dir)):
            t0 = time.time()
            features.train_classifier(c.data, str(cls_dir), seed=0)
            self.log_time("protocol", "classifier", time.time() - t0)
        fnet = features.load_classifier(str(cls_dir))
        split = str(s.reference_split or c.data.split_train)
        ref_path = self.workdir / "eval" / f"reference-{re.sub(r'[^A-Za-z0-9_.+-]+', '_', split).strip('_')}.npz"
        if not ref_path.exists() or metrics.load_reference_stats(str(ref_path)).get("network") != fnet.name:
            ref_path.parent.mkdir(parents=True, exist_ok=True)
            stats = metrics.reference_stats_from_images(self._uint8_batches(split), fnet.host_fn(),
                                                        keep_pool=reference.REF_POOL, network=fnet.name)
            with ref_path.open("wb") as f:
                metrics.save_reference_stats(f, stats)
        ref = metrics.load_reference_stats(str(ref_path))
        heldout = int(pipeline.make_source(c.data, c.data.split_eval)[1]["num_examples"])
        n = min(int(s.num_samples), heldout)
        if n < int(s.num_samples):
            logging.warning("config.study.num_samples=%d > the %d held-out images: N = %d", s.num_samples, heldout, n)
        self._protocol = dict(fnet=fnet, classifier=str(cls_dir), reference_path=str(ref_path), reference=ref,
                              reference_split=split, reference_count=int(ref["count"]), num_samples=n,
                              heldout_split=str(c.data.split_eval), heldout_count=heldout,
                              classifier_accuracy=classifier.load(str(cls_dir))[0]["test_accuracy"])
        return self._protocol

    def protocol_summary(self) -> dict:
        p = self.protocol()
        return {k: p[k] for k in ("reference_split", "reference_count", "num_samples", "heldout_split",
                                  "heldout_count", "classifier_accuracy")} | {"feature_network": p["fnet"].name}

    def _uint8_batches(self, split: str, batch_size: int = 512):
        for b in pipeline.make_eval_batches(self.config.data, split, batch_size=batch_size):
            yield pictures.to_uint8(b["image"])

    def eval_config(self, variant: Variant, seed: int, sampler: dict):
        """The run's config set up for fid.evaluate with this sampler and the shared protocol."""
        p, c = self.protocol(), self.run_config(variant, seed)
        for k, v in sampler.items():
            c.sampler[k] = v
        c.eval.num_samples, c.eval.batch_size = p["num_samples"], int(self.config.study.batch_size)
        c.eval.reference, c.eval.feature_network = p["reference_path"], f"classifier:{p['classifier']}"
        c.eval.save_samples = False
        return c

    def evaluate(self, variant: Variant, seed: int, sampler: dict, study: str) -> dict:
        """FID & co. of one run with one sampler (config.sampler fields), cached in its eval/."""
        run = self.train(variant, seed, study)
        c = self.eval_config(variant, seed, sampler)
        p = self.protocol()
        name = samplers.sampler_name(config_lib.sampler_config(c))
        path = run / "eval" / f"{name}-{p['num_samples']}.json"
        if path.exists():
            rec = json.loads(path.read_text())
            if (rec["protocol"]["feature_network"] == p["fnet"].name
                    and rec["protocol"]["reference"] == f"npz:{p['reference_path']}"):
                return rec
        t0 = time.time()
        rec = fid.evaluate(c, str(run))
        self.log_time(study, f"evaluate {run.name} {name}", time.time() - t0)
        return rec

    def noise_floor(self, seed: int) -> dict:
        """Real held-out images (a seeded subset of N, all of them when N is the held-out size)
        scored exactly as the samples are: the lowest FID this protocol can tell apart."""
        p = self.protocol()
        path = self.workdir / "eval" / f"noise_floor-{p['num_samples']}-seed{seed}.json"
        if path.exists():
            rec = json.loads(path.read_text())
            if rec["feature_network"] == p["fnet"].name and rec["reference"] == p["reference_path"]:
                return rec
        images = np.concatenate(list(self._uint8_batches(p["heldout_split"])))
        n = p["num_samples"]
        if n < len(images):
            images = images[np.sort(np.random.default_rng(seed).choice(len(images), n, replace=False))]
        feats = fid.image_features(p["fnet"], (images[i:i + 512] for i in range(0, n, 512)))
        scores = fid.score(feats, p["reference"], p["fnet"].name)
        rec = {k: float(scores[k]) for k in FID_METRICS if k in scores}
        rec.update(num_samples=n, seed=seed, feature_network=p["fnet"].name, reference=p["reference_path"])
        path.write_text(json.dumps(rec, indent=2))
        return rec

    def noise_floor_summary(self) -> dict[str, dict]:
        recs = [self.noise_floor(s) for s in self.seeds]
        return {k: summarize([r.get(k) for r in recs]) for k in FID_METRICS}


def final_metric(run: epath.Path, key: str) -> float | None:
    """The last value of `key` in a run's metrics.jsonl (e.g. the final val_loss)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return None
    value = None
    for line in path.read_text().splitlines():
        row: dict[str, Any] = json.loads(line)
        value = row.get(key, value)
    return value
