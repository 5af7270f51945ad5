"""Following a run while it goes: ``live.json`` and the terminal progress line.

The driver keeps one :class:`Progress` for the whole run. Each stage hands a
Tune callback (:meth:`Progress.callback`) to its Tuner; Tune calls it in the
driver process when a trial starts, reports an epoch, finishes or fails. On
every such event the driver

- rewrites ``<root>/live.json`` atomically (what ``runner dashboard`` polls)::

    {"run", "storage", "updated",
     "state": "running"|"finished"|"failed"|"interrupted",
     "ray_logs": folder of Ray's own log files (local clusters),
     "stages": [{"index", "name", "epochs", "trials", "status"}],
     "current": {"stage", "trial"} | null,
     "trials": [{"stage", "name", "status", "variant", "lr", "started",
                 "epochs": [{epoch, val_acc, val_loss, train_loss, train_acc,
                             images_per_s, data_wait_frac, flops, cpu_s, wall_s,
                             restarts}]}],
     "eta_s": seconds left (an estimate) | null}

- logs one line per epoch: stage, trial, epoch, validation accuracy,
  throughput and the time left.

The estimate counts the epochs still to run (every remaining trial of every
remaining stage at its full length, ASHA's early stops ignored, and the
baseline as long as the growth path so far) times the mean epoch time seen so
far, plus the mean start-up time of a trial for each trial still to start.
It is an upper bound while ASHA stops trials early.
"""

from __future__ import annotations

import logging
import time

from ray import tune

from runner import storage
from runner.growth.variants import trial_name

log = logging.getLogger("runner.progress")

LIVE = "live.json"
EPOCH_KEYS = ("epoch", "val_acc", "val_loss", "train_loss", "train_acc",
              "images_per_s", "data_wait_frac", "flops", "cpu_s", "wall_s",
              "restarts")


class Progress:
    """The live state of one run, written to ``live.json`` on every change."""

    def __init__(self, root: storage.Location, run: str, stages: list[tuple],
                 ray_logs: str | None = None):
        """``stages``: (name, epochs per trial, trials) for every stage to
        come, the baseline included (its length is filled in when it starts)."""
        self.root = root
        self.state = {
            "run": run, "storage": root.uri, "updated": time.time(),
            "state": "running", "ray_logs": ray_logs,
            "stages": [{"index": i + 1, "name": n, "epochs": e, "trials": t,
                        "status": "pending"} for i, (n, e, t) in enumerate(stages)],
            "current": None, "trials": [], "eta_s": None}
        self._epoch_s: list[float] = []     # wall time of every epoch seen
        self._startup_s: list[float] = []   # trial start to its first epoch's start

    # --- stage and run events (from the driver loop) ---------------------------

    def stage(self, name: str) -> dict:
        return next(s for s in self.state["stages"] if s["name"] == name)

    def stage_started(self, name: str, epochs: int, trials: int) -> None:
        self.stage(name).update(status="running", epochs=epochs, trials=trials)
        self._write()

    def stage_done(self, name: str) -> None:
        self.stage(name)["status"] = "done"
        self.state["current"] = None
        self._write()

    def finished(self, state: str = "finished") -> None:
        """The run ended: "finished", "failed" or "interrupted" (Ctrl-C)."""
        self.state["state"] = state
        self.state["current"] = None
        self.state["eta_s"] = 0.0 if state == "finished" else None
        self._write()

    def callback(self, stage: str) -> tune.Callback:
        global _ACTIVE
        _ACTIVE = self
        return _TuneEvents(stage)

    # --- trial events (from Tune, through _TuneEvents) ---------------------------

    def trial(self, stage: str, name: str, config: dict) -> dict:
        for t in self.state["trials"]:
            if t["stage"] == stage and t["name"] == name:
                return t
        t = {"stage": stage, "name": name, "status": "PENDING",
             "variant": config.get("variant"), "lr": config.get("lr"),
             "started": None, "epochs": []}
        self.state["trials"].append(t)
        return t

    def trial_started(self, stage: str, name: str, config: dict) -> None:
        t = self.trial(stage, name, config)
        t["status"], t["started"] = "RUNNING", time.time()
        self.state["current"] = {"stage": stage, "trial": name}
        self._write()

    def trial_result(self, stage: str, name: str, config: dict, result: dict) -> None:
        t = self.trial(stage, name, config)
        t["status"] = "RUNNING"
        epoch = {k: result[k] for k in EPOCH_KEYS if k in result}
        self._say_restart(stage, t, epoch)
        t["epochs"] = [e for e in t["epochs"] if e.get("epoch") != epoch.get("epoch")]
        t["epochs"].append(epoch)
        wall = result.get("epoch_wall_s")
        if wall:
            self._epoch_s.append(wall)
            if len(t["epochs"]) == 1 and t["started"]:
                self._startup_s.append(max(0.0, time.time() - t["started"] - wall))
        self._write()
        log.info("%s", self._line(stage, t, epoch))

    def _say_restart(self, stage: str, trial: dict, epoch: dict) -> None:
        """A trial's workers restarted since its last result (a worker or node
        lost, or the run resumed): say where it went on from, on the console,
        since what the workers log stays in Ray's log files."""
        before = max((e.get("restarts") or 0 for e in trial["epochs"]), default=0)
        now = epoch.get("restarts") or 0
        if now <= before:
            return
        n = epoch.get("epoch", 1)
        where = (f"went on after epoch {n - 1} from its checkpoint" if n > 1 else
                 "started over from its first weights (no readable checkpoint "
                 "of its own; the worker log says why)")
        log.warning("[%s/%d %s] trial %s restarted (restart %d): %s",
                    self.stage(stage)["index"], len(self.state["stages"]), stage,
                    trial["name"], now, where)

    def trial_ended(self, stage: str, name: str, config: dict, status: str) -> None:
        self.trial(stage, name, config)["status"] = status
        self._write()

    # --- estimate and output ----------------------------------------------------

    def eta(self) -> float | None:
        """Seconds left in the run (see the module docstring), or None before
        the first epoch has been timed."""
        if not self._epoch_s:
            return None
        per_epoch = sum(self._epoch_s) / len(self._epoch_s)
        startup = sum(self._startup_s) / len(self._startup_s) if self._startup_s \
            else 0.0
        epochs, starts = 0, 0
        for s in self.state["stages"]:
            if s["status"] == "done":
                continue
            seen = [t for t in self.state["trials"] if t["stage"] == s["name"]]
            if s["name"] == "baseline" and s["status"] == "pending":
                # Allowed the growth path's compute: roughly as many epochs.
                epochs += sum(x["epochs"] for x in self.state["stages"]
                              if x["name"] != "baseline")
                starts += 1
                continue
            finished = [t for t in seen if t["status"] in ("TERMINATED", "ERROR")]
            running = [t for t in seen if t["status"] == "RUNNING"]
            epochs += sum(max(0, s["epochs"] - len(t["epochs"])) for t in running)
            waiting = max(0, s["trials"] - len(finished) - len(running))
            epochs += waiting * s["epochs"]
            starts += waiting
        return epochs * per_epoch + starts * startup

    def _line(self, stage: str, trial: dict, epoch: dict) -> str:
        s = self.stage(stage)
        names = [t["name"] for t in self.state["trials"] if t["stage"] == stage]
        best = max(e.get("val_acc", 0.0) for e in trial["epochs"])
        eta = self.state["eta_s"]
        return (f"[{s['index']}/{len(self.state['stages'])} {stage}] trial "
                f"{names.index(trial['name']) + 1}/{s['trials']} {trial['name']} "
                f"epoch {epoch.get('epoch', '?')}/{s['epochs']}: val_acc "
                f"{epoch.get('val_acc', float('nan')):.4f} (best {best:.4f}), "
                f"{epoch.get('images_per_s', 0):.0f} img/s, data wait "
                f"{100 * epoch.get('data_wait_frac', 0):.0f}%"
                + (f"; about {format_duration(eta)} left" if eta is not None else ""))

    def _write(self) -> None:
        self.state["updated"] = time.time()
        self.state["eta_s"] = self.eta() if self.state["state"] == "running" \
            else self.state["eta_s"]
        try:
            storage.write_json(self.root.join(LIVE), self.state)
        except Exception as err:  # progress must never stop a run
            log.warning("could not write %s: %s", self.root.join(LIVE).uri, err)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


_ACTIVE: Progress | None = None  # the run this driver process is following


class _TuneEvents(tune.Callback):
    """Tune's trial events for one stage, passed on to the active
    :class:`Progress`. It holds only the stage name: Tune pickles its callbacks
    with the experiment, and a stage restored after a crash must report to the
    new driver's Progress, not to a copy of the old one."""

    def __init__(self, stage: str):
        self.stage = stage

    def _send(self, event: str, trial, *args) -> None:
        if _ACTIVE is not None:
            getattr(_ACTIVE, event)(self.stage, trial_name(trial.config),
                                    trial.config, *args)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._send("trial_started", trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._send("trial_result", trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._send("trial_ended", trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._send("trial_ended", trial, "ERROR")
