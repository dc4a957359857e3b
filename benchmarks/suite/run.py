"""The performance suite: diffjax against diffusers-Flax and diffusers-PyTorch, side by side, in one run.

    .venv/bin/python benchmarks/suite/run.py                                  # all sections, the matched CPU comparison
    .venv/bin/python benchmarks/suite/run.py --sections train,sample --rounds 7
    .venv/bin/python benchmarks/suite/run.py --spec tiny --rounds 2           # a quick try of every section
    .venv/bin/python benchmarks/suite/run.py --out suite.json                 # also write every figure as JSON

Sections (``--sections``, comma-separated):
  train    train-step images/s: diffjax's real ``Trainer.step`` against diffusers-Flax's and diffusers-PyTorch's
           text-to-image train steps (eager and ``torch.compile``), the matched architecture of
           ``suite_jobs.SPECS[--spec]`` (parameter counts printed), plus the FLOP rate of each step (its framework's
           own FLOP count / step time) as a fraction of the dense matmul peak measured in the same rounds, and how
           many cores each kept busy (process CPU time / wall time), with the page faults a call costs and the
           kernel's share of the CPU time (zeroing the fresh pages of buffers allocated anew by every call); the
           FLOP rate of the demo's own train step (the fashion_mnist config, batch 64) too;
  sample   50-step DDIM + classifier-free guidance images/s: ``Text2Image.generate`` (tokenization and text encoding
           included) and the bare sampler, against a FlaxStableDiffusionPipeline-style jitted loop and diffusers'
           PyTorch pipeline loop (eager and compiled);
           diffjax's jobs run with the XLA flag its command line sets (``diffjax.xla_cpu``: XLA:CPU's own
           convolution kernels instead of YNNPACK's); diffusers-Flax runs both as it ships and with that flag
           (``diffusers-flax+xla-conv``), so that the ratio to each is printed;
  compile  the train step's compile time for the tiny, fashion_mnist and matched configs, cold (an empty persistent
           compilation cache) and warm (the cache the cold run filled); the sampler at 10 vs 1000 steps; the
           programs compiled by a process that varies prompts, seeds, guidance and batches after its first call;
  memory   the train step's peak memory from XLA's memory analysis (arguments + outputs + temporaries - aliased),
           with and without remat, at two batch sizes;
  input    the input pipeline: real batches against one synthetic batch (benchmarks/suite/train_input.py).

Method: every job of a section (one framework, one way of running it) lives in a process of its own (its own
threads, allocator, compilation), built and warmed up one after another; then the driver times them in rounds,
one after another, the order rotating each round, so that machine load drifting during the run hits all alike.
Each round of a job runs as many calls as fill ``--round-seconds``; the medians over rounds are reported, with
ratios to diffjax. Numbers depend on the machine: compare ratios measured in one run.
Every process, whatever its framework, runs with the same memory allocator (``--malloc``): tcmalloc when it is
installed, as diffjax's command line runs (``diffjax.xla_cpu.exec_with_tcmalloc``), or glibc's (``system``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, HERE]

SECTIONS = ("train", "sample", "compile", "memory", "input")
TRAIN_JOBS = ("matmul peak", "diffjax train", "diffusers-flax train", "diffusers-flax+xla-conv train",
              "pytorch train", "pytorch+compile train", "diffjax train (fashion_mnist config)")
SAMPLE_JOBS = ("diffjax Text2Image", "diffjax sampler", "diffusers-flax sample", "diffusers-flax+xla-conv sample",
               "pytorch sample", "pytorch+compile sample")
# Several JAX processes share an accelerator during a run: none may take 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Compile times are measured cold: no persistent compilation cache in the driver, its workers and probes
# (importing diffjax would otherwise turn one on, diffjax/runtime.py); run_probe's cache_dir sets one explicitly.
os.environ.setdefault("DIFFJAX_COMPILATION_CACHE", "off")
TAG = "@@suite "  # prefix of the worker's protocol lines on its stdout (libraries may print there too)


# ------------------------------------------------------------------------------------------------------------------
# Workers: one job per process, timed on request
# ------------------------------------------------------------------------------------------------------------------

def _say(obj) -> None:
    sys.stdout.write(TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker(job_name: str, spec_json: str) -> None:
    """Build the job, report it, then answer each ``N`` on stdin with the wall and CPU seconds of N calls, the
    system (kernel) share of that CPU time and the page faults the calls cost."""
    from suite_jobs import JOBS, Spec

    spec = Spec(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(spec_json).items()})
    try:
        job = JOBS[job_name](spec)
    except Exception as e:  # reported, not fatal to the suite: the other jobs still run
        _say({"error": f"{type(e).__name__}: {e}"})
        return
    job.run()  # one more warm-up call after the first
    _say({"ready": True, "images": job.images, **job.info})
    for line in sys.stdin:
        n = int(line)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(n):
            job.run()
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        sys_s = r1.ru_stime - r0.ru_stime
        _say({"wall": wall, "cpu": r1.ru_utime - r0.ru_utime + sys_s, "sys": sys_s,
              "faults": r1.ru_minflt - r0.ru_minflt, "n": n})


class Worker:
    def __init__(self, name: str, spec, env=None):
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", name, "--spec-json",
             json.dumps(dataclasses.asdict(spec))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
        return {"error": f"exited with status {self.proc.wait()} (its stderr is above)"}

    def time(self, n: int) -> dict:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def timed_rounds(names, spec, rounds: int, round_seconds: float) -> dict:
    """Build each job in its own process (one after another), then time them in rotating rounds."""
    workers = []
    for name in names:
        print(f"  building {name} ...", flush=True)
        w = Worker(name, spec)
        if "error" in w.info:
            print(f"  {name}: skipped: {w.info['error']}", flush=True)
            w.close()
            continue
        workers.append(w)
    calls = {}
    for w in workers:  # calls per round from one calibration call
        probe = w.time(1)
        calls[w.name] = max(1, math.ceil(round_seconds / max(probe["wall"], 1e-6)))
    results = {w.name: {"info": w.info, "wall": [], "cpu": [], "sys": [], "faults": []} for w in workers}
    for r in range(rounds):
        order = workers[r % len(workers):] + workers[: r % len(workers)] if workers else []
        for w in order:
            out = w.time(calls[w.name])
            results[w.name]["wall"].append(out["wall"] / out["n"])
            for key in ("cpu", "sys", "faults"):
                results[w.name][key].append(out[key] / out["n"])
    for w in workers:
        w.close()
    for name, res in results.items():
        res["seconds"] = statistics.median(res["wall"])
        res["cores"] = statistics.median(c / w for c, w in zip(res["cpu"], res["wall"]))
        # Time in the kernel, mostly zeroing fresh pages: page faults on buffers allocated anew by each call.
        res["sys_share"] = statistics.median(k / max(c, 1e-9) for k, c in zip(res["sys"], res["cpu"]))
        res["faults_per_call"] = statistics.median(res["faults"])
        res["images_per_s"] = res["info"]["images"] / res["seconds"] if res["info"]["images"] else None
    return results


def report_rate(results: dict, base: str, peers: list[str], title: str) -> None:
    print(f"\n{title}")
    print(f"  {'job':31s} {'images/s':>9s} {'x ' + base:>18s} {'params':>11s} {'cores':>6s} {'first call':>11s} "
          f"{'faults/call':>12s} {'sys':>5s}")
    b = results.get(base, {}).get("images_per_s")
    for name, res in results.items():
        if res["images_per_s"] is None or not res["info"].get("compared", True):
            continue
        info = res["info"]
        ratio = f"{res['images_per_s'] / b:.2f}" if b else "-"
        params = f"{info['params']:,}" if info.get("params") else ""
        print(f"  {name:31s} {res['images_per_s']:9.2f} {ratio:>18s} {params:>11s} {res['cores']:6.2f} "
              f"{info.get('first_s', 0):10.1f}s {res['faults_per_call']:12,.0f} {100 * res['sys_share']:4.0f}%")
    if b:
        for peer_group in peers:
            present = [results[p]["images_per_s"] for p in peer_group if p in results]
            if present:
                best = max(present)
                print(f"  {base} / best of {' | '.join(p for p in peer_group if p in results)}: {b / best:.2f}x")


def section_train(spec, args, record) -> None:
    res = timed_rounds(TRAIN_JOBS, spec, args.rounds, args.round_seconds)
    record["train"] = res
    report_rate(res, "diffjax train", [["diffusers-flax train"], ["diffusers-flax+xla-conv train"],
                                       ["pytorch train", "pytorch+compile train"]],
                f"train step, batch {spec.batch} ({args.rounds} rounds, medians)")
    peak = res.get("matmul peak")
    if peak:
        rate = peak["info"]["flops"] / peak["seconds"]
        n, dt = peak["info"].get("n", 1024), peak["info"].get("dtype", "float32")
        print(f"  dense matmul peak (XLA, {dt} {n}^3 chained): {rate / 1e9:.1f} GFLOP/s, {peak['cores']:.2f} cores")
        for name, r in res.items():
            flops = r["info"].get("flops")
            if flops and name != "matmul peak":
                achieved = flops / r["seconds"]
                r["flop_fraction"] = achieved / rate
                print(f"  {name:35s} {flops / 1e9:8.1f} GFLOP/step, {achieved / 1e9:6.1f} GFLOP/s = "
                      f"{100 * achieved / rate:.1f}% of the matmul peak")


def section_sample(spec, args, record) -> None:
    res = timed_rounds(SAMPLE_JOBS, spec, args.rounds, args.round_seconds)
    record["sample"] = res
    report_rate(res, "diffjax Text2Image", [["diffusers-flax sample"], ["diffusers-flax+xla-conv sample"],
                                            ["pytorch sample", "pytorch+compile sample"]],
                f"sampling: 50 DDIM steps, guidance 7.5, batch {spec.sample_batch} ({args.rounds} rounds, medians)")
    if "diffjax sampler" in res and res["diffjax sampler"]["images_per_s"]:
        s = res["diffjax sampler"]["images_per_s"]
        for peer in ("diffusers-flax sample", "diffusers-flax+xla-conv sample", "pytorch sample",
                     "pytorch+compile sample"):
            if peer in res:
                print(f"  diffjax sampler / {peer}: {s / res[peer]['images_per_s']:.2f}x")


# ------------------------------------------------------------------------------------------------------------------
# Compilation and memory: probes in fresh processes
# ------------------------------------------------------------------------------------------------------------------

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def _config_for(name: str, spec):
    from suite_jobs import diffjax_config

    if name == "matched":
        return diffjax_config(spec)
    from diffjax.config import load_config

    return load_config(os.path.join(ROOT, "experiments", "configs", f"{name}.py"), [])


def probe(kind: str, arg: str, spec) -> None:
    """In a fresh process: ``train`` (compile seconds of a config's train step), ``sampler`` (compile seconds of
    the fashion_mnist pipeline at ``arg`` steps), ``recompiles`` or ``memory``; one JSON line. Compiled with the
    XLA flags diffjax's command line sets (``diffjax.xla_cpu``)."""
    from diffjax import xla_cpu

    xla_cpu.use_xla_convolutions()
    import jax

    compile_s = {"s": 0.0, "backend": 0}
    events = {}

    def listen(event, duration, **_):
        events[event] = events.get(event, 0.0) + duration
        if event in COMPILE_EVENTS:
            compile_s["s"] += duration
            compile_s["backend"] += event == COMPILE_EVENTS[-1]

    jax.monitoring.register_event_duration_secs_listener(listen)
    import numpy as np

    from diffjax.train import Trainer

    def trainer(name, **over):
        config = _config_for(name, spec)
        for k, v in over.items():
            setattr(config.training if k == "batch_size" else config.model.unet, k, v)
        return Trainer(config, image_shape=(config.data.image_size, config.data.image_size,
                                            config.model.unet.in_channels))

    def batch(tr, seed=0):
        b, rng = tr.config.training.batch_size, np.random.default_rng(seed)
        ids, mask = tr.models.text_encoder.tokenize([f"a photo of a {w}" for w in rng.choice(
            ["coat", "bag", "dress", "sandal"], b)])
        return {"image": rng.uniform(-1, 1, (b,) + tr.image_shape).astype(np.float32), "token_ids": ids,
                "mask": mask, "label": rng.integers(0, 10, b).astype(np.int32)}

    if kind == "train":
        tr = trainer(arg)
        abstract_batch = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch(tr))
        t0 = time.perf_counter()
        tr.step.lower(tr.abstract_state, abstract_batch).compile()
        _say({"seconds": time.perf_counter() - t0, "trace": events.get(COMPILE_EVENTS[0], 0.0),
              "lower": events.get(COMPILE_EVENTS[1], 0.0), "backend": events.get(COMPILE_EVENTS[2], 0.0),
              "cache_read": events.get("/jax/compilation_cache/cache_retrieval_time_sec", 0.0)})
    elif kind == "sampler":
        pipe = _fashion_pipeline(trainer("fashion_mnist"))
        pipe.generate(["a coat"], num_steps=int(arg), batch_size=1)
        _say({"seconds": compile_s["s"], "programs": compile_s["backend"]})
    elif kind == "recompiles":
        tr = trainer("fashion_mnist")
        state = tr.init()
        state, m = tr.step(state, tr.shard_batch(batch(tr, 0)))
        pipe = _fashion_pipeline(tr)
        # The pipeline's two guided programs: guidance at every step, and guidance in an interval of noise levels
        # (outside it the network runs on the conditional half alone: a lax.cond holding a second network).
        pipe.generate(["a coat", "a bag"], seed=0, guidance_scale=2.0, batch_size=2)
        pipe.generate(["a coat", "a bag"], seed=0, guidance_scale=2.0, batch_size=2, guidance_interval=(0.3, 6.0))
        first = compile_s["backend"]
        for i in range(1, 4):
            state, m = tr.step(state, tr.shard_batch(batch(tr, i)))
            words = (["dress", "sandal"], ["shirt", "trouser"], ["bag", "coat"])[i - 1]
            pipe.generate([f"a photo of a {w}" for w in words], seed=i, guidance_scale=1.5 + i, batch_size=2,
                          guidance_interval=(0.1 * i, 5.0 + i))
            pipe.generate(words, seed=10 + i, guidance_scale=2.5 + i, batch_size=2)
        jax.block_until_ready(m["loss"])
        _say({"first": first, "after": compile_s["backend"] - first})
    elif kind == "memory":
        remat, b = arg.split(",")
        tr = trainer("matched", remat=remat == "1", batch_size=int(b))
        abstract_batch = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch(tr))
        ma = tr.step.lower(tr.abstract_state, abstract_batch).compile().memory_analysis()
        _say({"temp": ma.temp_size_in_bytes, "args": ma.argument_size_in_bytes, "out": ma.output_size_in_bytes,
              "alias": ma.alias_size_in_bytes,
              "peak": ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
              - ma.alias_size_in_bytes})


def _fashion_pipeline(tr):
    from diffjax.pipeline import Text2Image

    state = tr.init()
    sc = tr.config.sampling
    comp = tr.models.component
    return Text2Image(tr.models, state.ema_params[comp], state.ema_params.get("text", state.frozen.get("text")),
                      tr.image_shape, sampler=sc.sampler, num_steps=sc.num_steps, guidance_scale=sc.guidance_scale,
                      timestep_spacing=sc.timestep_spacing)


def run_probe(kind: str, arg: str, spec, cache_dir: str | None = None) -> dict:
    env = dict(os.environ, DIFFJAX_COMPILATION_CACHE="off")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe", kind, "--probe-arg", arg,
                           "--spec-json", json.dumps(dataclasses.asdict(spec))], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(TAG):
            return json.loads(line[len(TAG):])
    raise RuntimeError(f"probe {kind} {arg} failed:\n{proc.stderr[-3000:]}")


def section_compile(spec, args, record) -> None:
    out = record.setdefault("compile", {})
    print("\ncompilation (fresh processes)")
    for name in ("tiny", "fashion_mnist", "matched"):
        with tempfile.TemporaryDirectory(prefix="suite-xla-cache-") as cache:
            cold = run_probe("train", name, spec, cache)
            warm = run_probe("train", name, spec, cache)
        out[f"train {name}"] = {"cold": cold, "warm": warm}
        print(f"  train step, {name:13s}: {cold['seconds']:6.1f} s cold, {warm['seconds']:5.1f} s warm (persistent "
              f"cache); cold: trace {cold['trace']:.1f} + lower {cold['lower']:.1f} + XLA {cold['backend']:.1f} s, "
              f"warm: trace {warm['trace']:.1f} + lower {warm['lower']:.1f} + XLA {warm['backend']:.1f} s "
              f"(cache read {warm['cache_read']:.1f} s)")
    few, many = run_probe("sampler", "10", spec), run_probe("sampler", "1000", spec)
    out["sampler"] = {"10": few, "1000": many}
    print(f"  fashion_mnist sampler: {few['seconds']:.1f} s at 10 steps, {many['seconds']:.1f} s at 1000 steps "
          f"({many['seconds'] / few['seconds']:.2f}x)")
    rec = run_probe("recompiles", "", spec)
    out["recompiles"] = rec
    print(f"  programs compiled after the first train step and sample: {rec['after']} (first calls: {rec['first']}; "
          "then 3 steps on new batches, 6 generate calls with new prompts, seeds, guidance scales and intervals)")


def section_memory(spec, args, record) -> None:
    out = record.setdefault("memory", {})
    print("\ntrain step peak memory (XLA memory analysis, matched U-Net)")
    batches = (spec.batch, 4 * spec.batch)
    for b in batches:
        plain, remat = run_probe("memory", f"0,{b}", spec), run_probe("memory", f"1,{b}", spec)
        out[str(b)] = {"plain": plain, "remat": remat}
        cut = 1 - remat["peak"] / plain["peak"]
        print(f"  batch {b:3d}: {plain['peak'] / 2**20:7.1f} MiB without remat, {remat['peak'] / 2**20:7.1f} MiB "
              f"with ({100 * cut:.0f}% less; temporaries {plain['temp'] / 2**20:.1f} -> "
              f"{remat['temp'] / 2**20:.1f} MiB)")


def section_input(spec, args, record) -> None:
    print("\ninput pipeline (benchmarks/suite/train_input.py, fashion_mnist config)")
    if not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"):
        print("  skipped: Fashion-MNIST's IDX files are not installed (apt-get install dataset-fashion-mnist)")
        return
    proc = subprocess.run([sys.executable, os.path.join(HERE, "train_input.py"), "--rounds", str(args.rounds)],
                          cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    for ln in lines[-3:]:
        print("  " + ln)
    record["input"] = lines[-1:] if proc.returncode == 0 else proc.stderr[-2000:]


def machine() -> str:
    import importlib.metadata as md

    versions = []
    for pkg in ("jax", "jaxlib", "flax", "diffusers", "torch", "transformers"):
        try:
            versions.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs; python {platform.python_version()}; " + ", ".join(versions)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    p.add_argument("--spec", default="matched", help="the architecture and batch (suite_jobs.SPECS)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=0, help="train batch (default: the spec's)")
    p.add_argument("--sample-batch", type=int, default=0, help="images per sampling call (default: the spec's)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--round-seconds", type=float, default=2.0, help="calls per round fill at least this long")
    p.add_argument("--jobs", default="", help="only these jobs (comma-separated names) in train/sample")
    p.add_argument("--out", default="", help="also write every figure to this JSON file")
    p.add_argument("--malloc", default="tcmalloc", choices=["tcmalloc", "system"],
                   help="every job's memory allocator, whatever its framework: tcmalloc when installed (as "
                        "experiments.main runs; diffjax/xla_cpu.py) or glibc's")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--probe-arg", default="", help=argparse.SUPPRESS)
    p.add_argument("--spec-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from suite_jobs import Spec, spec_from

    if args.worker:
        return worker(args.worker, args.spec_json)
    if args.probe:
        spec = Spec(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.spec_json).items()})
        return probe(args.probe, args.probe_arg, spec)
    from diffjax import xla_cpu

    if args.malloc == "tcmalloc":
        xla_cpu.exec_with_tcmalloc()  # this process again under tcmalloc, which every job's process inherits
    else:  # drop what exec_with_tcmalloc (or the user) preloaded: any tcmalloc, and $DIFFJAX_MALLOC's build
        chosen = os.environ.get(xla_cpu.MALLOC_ENV, "")
        os.environ["LD_PRELOAD"] = " ".join(lib for lib in os.environ.get("LD_PRELOAD", "").split()
                                            if "tcmalloc" not in lib and lib != chosen)
        os.environ[xla_cpu.MALLOC_ENV] = "system"
    over = {"dtype": args.dtype}
    if args.batch:
        over["batch"] = args.batch
    if args.sample_batch:
        over["sample_batch"] = args.sample_batch
    spec = spec_from(args.spec, **over)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {', '.join(bad)}; valid: {', '.join(SECTIONS)}")
    if args.jobs:
        keep = {j.strip() for j in args.jobs.split(",")}
        global TRAIN_JOBS, SAMPLE_JOBS
        TRAIN_JOBS = tuple(j for j in TRAIN_JOBS if j in keep)
        SAMPLE_JOBS = tuple(j for j in SAMPLE_JOBS if j in keep)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}; {machine()}")
    print(f"spec {args.spec}: {spec}")
    print(f"memory allocator of every job: {xla_cpu.malloc_in_use()}")
    record = {"machine": machine(), "spec": dataclasses.asdict(spec), "date": time.strftime("%Y-%m-%d"),
              "malloc": xla_cpu.malloc_in_use()}
    funcs = {"train": section_train, "sample": section_sample, "compile": section_compile, "memory": section_memory,
             "input": section_input}
    for s in sections:
        t0 = time.perf_counter()
        funcs[s](spec, args, record)
        print(f"  ({s}: {time.perf_counter() - t0:.0f} s)", flush=True)
    if hasattr(os, "getloadavg"):
        print("load average (1, 5, 15 min): " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1, default=str)


if __name__ == "__main__":
    main()
