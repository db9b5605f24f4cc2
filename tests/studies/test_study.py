"""Every study end to end on tiny settings (digits smoke model, 8 steps, 2 seeds): report.md,
results.json and the PNGs are written; a killed study resumes without retraining or re-evaluating
what finished; a run trained under other fields is refused; --helpshort documents every flag."""

import json

import jax
import pytest

from configs import digits
from tests import REPO
from patch_forcing import study as study_main
from patch_forcing.evaluation import features
from patch_forcing.studies import runner, timesteps

pytestmark = [pytest.mark.usefixtures("fast_compiles"), pytest.mark.slow]
PNGS = {"timesteps": ["fid_per_schedule.png"], "samplers": ["fid_vs_nfe.png"],
        "difficulty": ["r_vs_t.png", "scatter_t0.6.png"], "context": ["context_loss.png"]}


def tiny_config():
    c = digits.get_config("smoke")
    c.log.eval_every_steps = c.log.sample_every_steps = c.checkpoint.every_steps = 8  # at the end only
    s = c.study
    s.seeds, s.num_samples, s.batch_size, s.nfe, s.budgets = 2, 32, 32, 9, (9,)  # samplers reuse the NFE-9 evals
    s.num_examples, s.difficulty_times, s.context_times, s.context_ratios = 32, (0.2, 0.6), (0.1,), (2.0,)
    return c


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compile cache, as `python -m patch_forcing.study` sets: seed 1 reuses seed 0's programs."""
    old = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, compile_cache):
    """The timesteps study (ltg, uniform x 2 seeds) killed when its third run starts, then resumed."""
    wd = str(tmp_path_factory.mktemp("study"))
    features.train_classifier(tiny_config().data, f"{wd}/classifier", steps=60, verbose=False)  # the protocol's
    real_train, real_eval = runner.train.train_and_evaluate, runner.fid.evaluate
    trained, evaluated = [], []

    def killing_train(config, run_dir):
        if len(trained) == 2:
            raise Killed(run_dir)
        trained.append(run_dir)
        return real_train(config, run_dir)

    mp = pytest.MonkeyPatch()
    mp.setattr(runner.train, "train_and_evaluate", killing_train)
    with pytest.raises(Killed):
        study_main.run_study("timesteps", tiny_config(), wd, only=("ltg", "uniform"))
    first = list(trained)
    mp.setattr(runner.train, "train_and_evaluate", lambda c, d: (trained.append(d), real_train(c, d))[1])
    mp.setattr(runner.fid, "evaluate", lambda c, d: (evaluated.append(d), real_eval(c, d))[1])
    results = study_main.run_study("timesteps", tiny_config(), wd, only=("ltg", "uniform"), config_name="smoke")
    mp.undo()
    return dict(dir=wd, first=first, trained=trained[len(first):], evaluated=evaluated, timesteps=results)


def test_killed_study_resumes_without_redoing_finished_runs(workdir):
    assert [r.split("/")[-1] for r in workdir["first"]] == ["uniform-seed0", "ltg-seed0"]  # seed-major
    assert [r.split("/")[-1] for r in workdir["trained"]] == ["uniform-seed1", "ltg-seed1"]
    assert [r.split("/")[-1] for r in workdir["evaluated"]] == ["uniform-seed1", "ltg-seed1"]


def _files(wd, name):
    out = f"{wd}/{name}"
    results = json.loads(open(f"{out}/results.json").read())
    for png in PNGS[name]:
        with open(f"{out}/{png}", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
    return results, open(f"{out}/report.md").read()


def test_timesteps_report_has_the_noise_floor_and_the_spread(workdir):
    results, md = _files(workdir["dir"], "timesteps")
    assert [v["name"] for v in results["variants"]] == ["uniform", "ltg"]
    for v in results["variants"]:
        assert v["fid"]["n"] == 2 and v["fid"]["std"] is not None and v["nfe"] == 9
    assert [v["sampler"] for v in results["variants"]] == ["euler-s9-cfg1.0", "euler_pf-s9-cfg1.0"]
    assert results["noise_floor"]["fid"]["n"] == 2 and results["protocol"]["num_samples"] == 32
    assert "**noise floor** (real held-out)" in md and " ± " in md and "reference = all 1500 images" in md
    assert results["claims"][0]["verdict"] in ("reproduced", "reversed", "not distinguishable")
    assert "timesteps" in open(f"{workdir['dir']}/report.md").read()


def test_samplers_reuse_the_runs_and_meet_the_budget(workdir, monkeypatch):
    monkeypatch.setattr(runner.train, "train_and_evaluate", lambda *a: pytest.fail("retrained a finished run"))
    evaluated = []
    real_eval = runner.fid.evaluate
    monkeypatch.setattr(runner.fid, "evaluate", lambda c, d: (evaluated.append(c.sampler.name), real_eval(c, d))[1])
    results = study_main.run_study("samplers", tiny_config(), workdir["dir"], only=("euler", "look_ahead"))
    _, md = _files(workdir["dir"], "samplers")
    assert evaluated == ["look_ahead", "look_ahead"]  # SiT euler at NFE 9: the timesteps study's evaluations
    assert {r["name"]: r["points"][0]["steps"] for r in results["samplers"]} == {"euler": 9, "look_ahead": 5}
    assert all(p["nfe"] == 9 and p["fid"]["n"] == 2 for r in results["samplers"] for p in r["points"])
    assert "FID @ NFE 9" in md and "noise floor" in md


def test_difficulty_and_context_studies(workdir, monkeypatch):
    monkeypatch.setattr(runner.train, "train_and_evaluate", lambda *a: pytest.fail("retrained a finished run"))
    diff = study_main.run_study("difficulty", tiny_config(), workdir["dir"])
    ctx = study_main.run_study("context", tiny_config(), workdir["dir"])
    _files(workdir["dir"], "difficulty")
    _files(workdir["dir"], "context")
    assert [r["t"] for r in diff["rows"]] == [0.2, 0.6] and diff["rows"][0]["pearson"]["n"] == 2
    assert [p["t_ctx"] for p in ctx["rows"][0]["points"]] == pytest.approx([0.1, 0.2, 1.0])
    assert ctx["rows"][0]["points"][0]["relative"]["mean"] == pytest.approx(1.0)
    index = open(f"{workdir['dir']}/report.md").read()
    assert all(f"`{name}`" in index for name in ("timesteps", "samplers", "difficulty", "context"))


def test_a_run_trained_with_other_fields_is_refused(workdir):
    c = tiny_config()
    c.optim.lr = 0.5
    with pytest.raises(ValueError, match=r"ltg-seed0 was trained with other \['optim'\] fields"):
        runner.Study(c, workdir["dir"]).train(timesteps.BY_NAME["ltg"], 0, "timesteps")


def test_helpshort_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        study_main.main(["study", "--helpshort"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--study", "--workdir", "--seeds", "--only"):
        assert flag in out
    with pytest.raises(ValueError, match=r"--only=foo: \['foo'\] are not timesteps variants"):
        timesteps.select(["foo"])
    argv = ["study", f"--config={REPO / 'configs/digits.py'}", "--workdir=/nonexistent"]
    with pytest.raises(SystemExit, match=r"--study=timesteps,bogus: \['bogus'\] are not studies"):
        study_main.main([*argv, "--study=timesteps,bogus"])
    with pytest.raises(SystemExit, match=r"--only: \['foo'\] are neither timesteps variants"):
        study_main.main([*argv, "--study=all", "--only=ltg,euler,foo"])
