"""One suite job (benchmarks/suite/suite_jobs.py) from two versions of the repository, timed side by side.

    .venv/bin/python benchmarks/suite/ab.py --old cba2c84 --job "diffjax train" --rounds 7 --calls 3
    .venv/bin/python benchmarks/suite/ab.py --old HEAD --old-env DIFFJAX_XLA_CPU_CONVOLUTIONS=off \
        --job "diffjax sampler"

The old version is checked out into a temporary git worktree; each version's job runs in a process of its own
(benchmarks/suite/run.py's worker protocol), the order alternating each round; medians and the speed ratio new/old.
``--old-env KEY=VALUE`` sets environment variables of the old version's process only: with ``--old HEAD`` it
times one tree with and without a setting (the second example: XLA:CPU's convolution kernels, diffjax.xla_cpu).
"""

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_driver(root: str, tag: str):
    path = os.path.join(root, "benchmarks", "suite", "run.py")
    if not os.path.exists(path):  # a revision from before the suite moved into benchmarks/suite/
        path = os.path.join(root, "benchmarks", "run.py")
    spec = importlib.util.spec_from_file_location(f"run_{tag}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="the git revision to compare the working tree against")
    p.add_argument("--job", default="diffjax train", help="a key of suite_jobs.JOBS")
    p.add_argument("--spec", default="matched", help="a key of suite_jobs.SPECS")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=3, help="calls per round")
    p.add_argument("--old-env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable of the old version's process (repeatable)")
    args = p.parse_args()
    old_env = dict(os.environ)
    for item in args.old_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--old-env {item!r} is not KEY=VALUE")
        old_env[key] = value
    with tempfile.TemporaryDirectory(prefix="diffjax-ab-") as tmp:
        old_root = os.path.join(tmp, "old")
        subprocess.run(["git", "worktree", "add", "-q", "--detach", old_root, args.old], cwd=ROOT, check=True)
        try:
            drivers = {"old": load_driver(old_root, "old"), "new": load_driver(ROOT, "new")}
            sys.path.insert(0, os.path.join(ROOT, "benchmarks", "suite"))
            from suite_jobs import SPECS

            workers = {k: d.Worker(args.job, SPECS[args.spec], env=old_env if k == "old" else None)
                       for k, d in drivers.items()}
            for k, w in workers.items():
                if "error" in w.info:
                    raise SystemExit(f"{k}: {w.info['error']}")
            times = {k: [] for k in workers}
            for r in range(args.rounds):
                for k in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    out = workers[k].time(args.calls)
                    times[k].append(out["wall"] / out["n"])
            for w in workers.values():
                w.close()
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", old_root], cwd=ROOT, check=False)
    med = {k: statistics.median(v) for k, v in times.items()}
    old_name = " ".join([args.old, *args.old_env])
    print(f"{args.job} ({args.spec}): old {old_name} {1e3 * med['old']:.1f} ms, new (working tree) "
          f"{1e3 * med['new']:.1f} ms per call; new/old speed {med['old'] / med['new']:.3f}x")


if __name__ == "__main__":
    main()
