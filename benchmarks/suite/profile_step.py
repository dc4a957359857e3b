"""Where one suite job's time goes: a `jax.profiler` trace of a few warm calls, XLA's kernels summed by name.

    .venv/bin/python benchmarks/suite/profile_step.py --job "diffjax train (fashion_mnist config)" --calls 3
    .venv/bin/python benchmarks/suite/profile_step.py --job "diffjax sampler" --spec matched --calls 1 --top 30

The job is built and warmed up as `benchmarks/suite/run.py` builds it (suite_jobs.JOBS), traced for ``--calls`` calls,
and the trace's kernel executions (the events that name an ``hlo_op``) are grouped: per kernel (a fusion, a
convolution, a YNNPACK kernel, ...) and per kind (the name without its numeric suffix), each with its total time
over the calls and its share of the traced wall time. Kernels run on several threads at once, so the shares can
add up to more than 100%. The trace itself is kept in ``--trace-dir`` for Perfetto or TensorBoard.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "suite"))


def kernel_events(trace: dict) -> list[dict]:
    """The trace's XLA kernel executions: complete ("X") events whose args name the HLO op they run."""
    return [e for e in trace.get("traceEvents", [])
            if e.get("ph") == "X" and "dur" in e and "hlo_op" in e.get("args", {})]


def kind(name: str) -> str:
    """A kernel's kind: its name without the numeric suffixes XLA gives each instance (``fusion.12`` -> fusion)."""
    return re.sub(r"([._]\d+)+$", "", name)


def hlo_lines(dump_dir: str) -> dict[str, dict[str, str]]:
    """Per HLO module name, each instruction's defining line in XLA's optimized HLO text dumped to ``dump_dir``."""
    out = {}
    for path in glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")):
        module = re.sub(r"^module_\d+\.", "", os.path.basename(path)).split(".")[0]
        table = out.setdefault(module, {})
        with open(path) as f:
            for line in f:
                m = re.match(r"\s*(?:ROOT\s+)?%?([\w.-]+)\s*=\s*(.*)", line)
                if m and "{" not in m.group(1):
                    table.setdefault(m.group(1), m.group(2).strip())
    return out


def describe(line: str, width: int = 110) -> str:
    """The result shape and op of an HLO line, without its metadata."""
    line = re.sub(r",\s*(metadata|backend_config|frontend_attributes)=.*", "", line)
    return line if len(line) <= width else line[:width - 3] + "..."


def summarize(trace: dict, wall_s: float, top: int, hlo: dict | None = None) -> str:
    events = kernel_events(trace)
    per_name, per_kind, count = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        op = e["args"]["hlo_op"]
        per_name[op] += e["dur"] * 1e-6
        per_kind[kind(op)] += e["dur"] * 1e-6
        count[kind(op)] += 1
    busy = sum(per_name.values())
    lines = [f"traced wall {wall_s:.3f} s; {len(events)} kernel executions, busy {busy:.3f} s "
             f"({busy / wall_s:.2f} threads on average); time and share of the wall time", "", "by kind:"]
    lines += [f"  {t:9.3f} s  {100 * t / wall_s:5.1f}%  {k} (x{count[k]})" for k, t in per_kind.most_common(top)]
    lines += ["", "by kernel:"]
    module = {e["args"]["hlo_op"]: e["args"].get("hlo_module", "") for e in events}
    for k, t in per_name.most_common(top):
        text = (hlo or {}).get(module[k], {}).get(k)
        lines.append(f"  {t:9.3f} s  {100 * t / wall_s:5.1f}%  {k}" + (f"  = {describe(text)}" if text else ""))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", default="diffjax train (fashion_mnist config)", help="a key of suite_jobs.JOBS")
    p.add_argument("--spec", default="matched", help="a key of suite_jobs.SPECS")
    p.add_argument("--calls", type=int, default=3, help="warm calls traced")
    p.add_argument("--top", type=int, default=25, help="rows per table")
    p.add_argument("--hlo-dir", default="", help="dump XLA's HLO here and show each listed kernel's instruction")
    p.add_argument("--trace-dir", default="", help="where the trace is written (default: a temporary folder)")
    args = p.parse_args()
    if args.hlo_dir:  # before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.hlo_dir}"
                                   " --xla_dump_hlo_as_text").strip()

    import jax

    import suite_jobs

    if args.job not in suite_jobs.JOBS:
        raise SystemExit(f"--job {args.job!r} is not one of: {', '.join(suite_jobs.JOBS)}")
    if args.spec not in suite_jobs.SPECS:
        raise SystemExit(f"--spec {args.spec!r} is not one of: {', '.join(suite_jobs.SPECS)}")
    job = suite_jobs.JOBS[args.job](suite_jobs.SPECS[args.spec])
    job.run()  # warm: compiled and run once more outside the trace
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="diffjax-profile-")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        t0 = time.perf_counter()
        for _ in range(args.calls):
            job.run()
        wall = time.perf_counter() - t0
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not files:
        raise SystemExit(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(files[-1], "rt") as f:
        trace = json.load(f)
    print(f"{args.job} ({args.spec}), {args.calls} calls; trace: {files[-1]}")
    print(summarize(trace, wall, args.top, hlo_lines(args.hlo_dir) if args.hlo_dir else None))


if __name__ == "__main__":
    main()
