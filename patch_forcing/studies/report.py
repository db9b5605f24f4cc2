"""Reports: markdown tables of mean +- std over seeds, the noise-floor row, the verdict on each of
the paper's claims, and the files: <workdir>/<study>/{report.md, results.json} and the index
<workdir>/report.md, which strings together every study finished in that workdir.

The one rule a reader must know (written into every report): two results differ only when their
mean +- std intervals do not overlap; otherwise they are "not distinguishable", never a win.
"""

from __future__ import annotations

import json
import time

from etils import epath

ORDER = ("timesteps", "samplers", "difficulty", "context")
RULE = ("Two results differ only when their mean ± std intervals (std over seeds) do not overlap; "
        "otherwise they are reported as *not distinguishable*.")


def fmt(summary: dict | None, digits: int = 2) -> str:
    """'12.34 ± 0.56', '12.34' for one seed, 'n/a' when nothing finite was measured."""
    if not summary or summary.get("mean") is None:
        return "n/a"
    m = f"{summary['mean']:.{digits}f}"
    return m if summary.get("std") is None else f"{m} ± {summary['std']:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(direction: str, expected: str) -> str:
    """A claim 'a is `expected` than b' ('lower'/'higher') against the measured direction."""
    if direction == "not distinguishable":
        return "not distinguishable"
    return "reproduced" if direction == expected else "reversed"


def header(title: str, study, results: dict) -> str:
    """Title, the machine, wall time and the protocol, shared by every study's report."""
    m, p = results["machine"], results.get("protocol")
    lines = [f"# Study: {title}", "",
             f"Config `{results['config']}`, {len(study.seeds)} seed(s), {study.train_steps} training steps per run. "
             f"Machine: {m['device']} x{m['devices']}, {m['cpu']} ({m['cpu_count']} CPUs, shared: load average "
             f"{m['load_average'][0]} at the end), jax {m['jax']}. Wall time of this study's runs and evaluations: "
             f"{results['wall_seconds'] / 60:.1f} min (summed over resumed invocations).", ""]
    if p:
        lines += [f"FID protocol: N = {p['num_samples']} samples per run and seed, features of "
                  f"`{p['feature_network']}` (this project's classifier, test accuracy "
                  f"{p['classifier_accuracy']:.3f}), "
                  f"reference = all {p['reference_count']} images of `{p['reference_split']}`; the noise-floor row "
                  f"scores N real held-out images of `{p['heldout_split']}` ({p['heldout_count']}) the same way. "
                  "Precision/recall: k = 3 nearest neighbours. " + RULE, ""]
    return "\n".join(lines)


def floor_note(fids: list[dict], floor: dict) -> str:
    """Whether the noise floor leaves room to tell these FIDs (summaries) apart, in one sentence."""
    means = [f["mean"] for f in fids if f["mean"] is not None]
    spreads = [f["std"] for f in fids if f["std"] is not None]
    if not means or floor["mean"] is None:
        return ""
    gap, spread = min(means) - floor["mean"], max(spreads) if spreads else float("nan")
    verdict = ("the protocol resolves differences larger than that spread" if gap > spread else
               "the results are within the protocol's noise of real data")
    where = f"{gap:.2f} above it" if gap >= 0 else (f"{-gap:.2f} below it (the samples are closer to the "
                                                   "reference than held-out real images are)")
    return (f"Noise floor FID {fmt(floor)}: the best result sits {where}, the FIDs span "
            f"{max(means) - min(means):.2f}, and the largest spread over seeds is {spread:.2f}; {verdict}.")


def write(workdir, name: str, markdown: str, results: dict) -> epath.Path:
    """<workdir>/<name>/report.md and results.json, then the index <workdir>/report.md."""
    workdir = epath.Path(workdir)
    out = workdir / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown.rstrip() + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    parts = [f"# Studies in {workdir}", "", f"Updated {time.strftime('%Y-%m-%d %H:%M')}; each study's "
             "folder holds its report.md, results.json and plots.", ""]
    for study in ORDER:
        path = workdir / study / "report.md"
        if path.exists():
            text = path.read_text().replace("](", f"]({study}/").replace(f"]({study}/http", "](http")
            parts += [text.replace("\n# ", "\n## ").replace("# Study", "## Study", 1), ""]
    (workdir / "report.md").write_text("\n".join(parts).rstrip() + "\n")
    return out
