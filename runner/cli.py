"""``runner``: ingest, grow, report, evaluate, predict, transfer.

Errors the user can fix print as one line (``runner: error: ...``) and exit
with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from runner.errors import RunnerError

EXAMPLES = {
    "ingest": "runner ingest ../shared/datasets/cats_dogs runs/data",
    "grow": "runner grow jobs/cats_dogs.yaml --set storage=runs/try1",
    "report": "runner report runs/cats_dogs",
    "evaluate": "runner evaluate runs/cats_dogs --data ../shared/datasets/cats_dogs",
    "predict": "runner predict runs/cats_dogs/stage-2/.../epoch-003 cat.jpg",
    "transfer": "runner transfer --from CKPT --to classifier_2 --kind plain_copy --out new",
}


def _loopback_default() -> None:
    # Keep every address of a Ray we start ourselves on 127.0.0.1.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def cmd_ingest(args) -> None:
    from runner.data.ingest import ingest, summary
    print(summary(ingest(args.data, args.out, base_size=args.base_size,
                         force=args.force)))


def cmd_grow(args) -> None:
    from runner.config import load_job
    from runner.growth.loop import grow
    job = load_job(args.job, args.set)
    if args.address:
        job.ray.address = args.address
    _loopback_default()
    grow(job)


def cmd_report(args) -> None:
    from runner.report import report
    print(report(args.run))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runner", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, func, help):
        s = sub.add_parser(name, help=help, description=help,
                           epilog=f"example: {EXAMPLES[name]}")
        s.set_defaults(func=func)
        return s

    s = add("ingest", cmd_ingest, "decode an image folder into Parquet shards")
    s.add_argument("data", help="folder with training_set/ and test_set/")
    s.add_argument("out", help="shards folder or URI")
    s.add_argument("--base-size", type=int, default=72, help="stored size, px")
    s.add_argument("--force", action="store_true", help="ingest even if unchanged")

    s = add("grow", cmd_grow, "run a growth job (all stages) from a YAML job file")
    s.add_argument("job", help="job file, e.g. jobs/cats_dogs.yaml")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set stages.0.epochs=1")
    s.add_argument("--address", help="Ray address ('auto' = a local ray start)")

    s = add("report", cmd_report, "print a run's stages, trials, winners and compute")
    s.add_argument("run", help="the run's storage root")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except RunnerError as err:
        print(f"runner: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("runner: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
