"""The run's story, from ``lineage.json`` alone: stages, trials, winners,
test accuracy and the compute spent."""

from __future__ import annotations

from runner import storage
from runner.errors import RunnerError


def _gflop(x: float) -> str:
    return f"{x / 1e12:.2f} TFLOP"


def _trial_line(trial: dict, winner: str) -> str:
    mark = "*" if trial["name"] == winner else " "
    if not trial.get("epochs"):
        return f"  {mark} {trial['name']:<40} failed: {trial.get('error')}"
    best, c = trial["best"], trial["compute"]
    drift = ""
    if trial.get("transfer") and trial["transfer"].get("acc_child") is not None:
        t = trial["transfer"]
        drift = (f"  transfer: val acc {t['acc_parent']:.3f} -> {t['acc_child']:.3f},"
                 f" max |dlogit| {t['max_abs_logit_diff']:.3g}")
    last = trial["epochs"][-1]["epoch"]
    stopped = f", stopped early after {last}" if trial.get("status") == "stopped early" \
        else ""
    return (f"  {mark} {trial['name']:<40} val_acc {best['val_acc']:.4f} "
            f"(best epoch {best['epoch']} of {last}{stopped})  {_gflop(c['flops'])} "
            f"{c['cpu_s']:.0f} cpu-s {c['wall_s']:.0f} s{drift}")


def _origin(stage: dict) -> str:
    parent = stage["parent"]
    if parent:
        return f"from {parent['stage']}/{parent['trial']}"
    loaded = [t["variant"]["checkpoint"] for t in stage["trials"]
              if t.get("variant", {}).get("op") == "load"]
    return f"from checkpoint {loaded[0]}" if loaded else "from scratch"


def format_report(lineage: dict) -> str:
    lines = [f"run {lineage['run']} at {lineage['storage']}"
             f"{'' if lineage.get('finished') else ' (unfinished)'}"]
    counts = lineage["data"]["counts"]
    lines.append("data: " + ", ".join(
        f"{split} {sum(c.values())} ({', '.join(f'{k} {v}' for k, v in c.items())})"
        for split, c in counts.items()))
    stages = lineage["stages"] + ([lineage["baseline"]] if lineage.get("baseline")
                                  else [])
    for stage in stages:
        lines.append(f"\nstage {stage['index']} {stage['name']} ({_origin(stage)})")
        lines += [_trial_line(t, stage["winner"]) for t in stage["trials"]]
        test, path = stage["test"], stage["path_compute"]
        per_class = ", ".join(f"{k} {v:.3f}" for k, v in test["per_class"].items())
        lines.append(f"  winner {stage['winner']}: val_acc {stage['val_acc']:.4f}, "
                     f"test_acc {test['accuracy']:.4f} on {test['images']} images "
                     f"({per_class})")
        lines.append(f"  path compute so far: {_gflop(path['flops'])}, "
                     f"{path['cpu_s']:.0f} cpu-s, {path['wall_s']:.0f} s; "
                     f"checkpoint {stage['checkpoint']}")
    if lineage.get("verdict"):
        lines.append(f"\nverdict: {lineage['verdict']['text']}")
    return "\n".join(lines)


def load_lineage(run: str) -> dict:
    """A run's lineage.json, refused by name if it is not one, with its paths
    re-rooted at ``run`` (see :func:`rerooted`)."""
    root = storage.resolve(run)
    loc = root.join("lineage.json")
    lineage = storage.read_json(loc)
    keys = ("run", "storage", "data", "stages")
    if not isinstance(lineage, dict) or any(k not in lineage for k in keys):
        raise RunnerError(f"{loc.uri}: not a runner lineage (needs {', '.join(keys)})")
    return rerooted(lineage, lineage["storage"], root.uri)


def rerooted(obj, written, root: str):
    """``obj`` (a lineage, or any JSON value) with every path under
    ``written``, the storage root the run was written in, moved under
    ``root``, where it is read from now: a copied or moved run folder then
    names its own checkpoints, not the ones it was copied from."""
    written = str(written or "").rstrip("/")
    root = root.rstrip("/")
    if not written or written == root:
        return obj
    if isinstance(obj, str):
        if obj == written or obj.startswith(written + "/"):
            return root + obj[len(written):]
        return obj
    if isinstance(obj, dict):
        return {k: rerooted(v, written, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rerooted(v, written, root) for v in obj]
    return obj


def report(run: str) -> str:
    return format_report(load_lineage(run))
