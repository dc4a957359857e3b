"""Is the second ``Text2Image.from_pretrained(...).generate(...)`` in a fresh process served from the compilation cache?

Importing diffjax turns on JAX's persistent compilation cache (``diffjax/runtime.py``), so a program compiled by
one process (a script, a notebook, the command line) is loaded from disk by the next. This study runs the same
few lines twice, each time in a fresh interpreter, against an empty cache directory of its own, and reports per
run: the seconds to import and load the model folder, the seconds of the first ``generate``, and the
compilation cache's hits and misses (``jax.monitoring`` events). The first run must miss and write; the second
must hit and be faster::

    python benchmarks/studies/first_generate.py                      # a tiny random model folder, made here
    python benchmarks/studies/first_generate.py --model runs/demo/model --num_steps 25

``DIFFJAX_COMPILATION_CACHE=off`` in the environment shows the cost without the cache (both runs miss).
The figures are recorded in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Run in a fresh interpreter: what a user's script does, timed, with the cache's events counted.
CHILD = """
import json, sys, time
t0 = time.perf_counter()
import jax
from diffjax.pipeline import Text2Image
counts = {"hits": 0, "misses": 0}
def on_event(event, **kw):
    if event == "/jax/compilation_cache/cache_hits":
        counts["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":
        counts["misses"] += 1
jax.monitoring.register_event_listener(on_event)
pipe = Text2Image.from_pretrained(sys.argv[1])
t1 = time.perf_counter()
images = pipe.generate(["a shirt", "a shoe"], seed=0, num_steps=int(sys.argv[2]))
t2 = time.perf_counter()
print(json.dumps(dict(load_s=t1 - t0, generate_s=t2 - t1, cache=jax.config.jax_compilation_cache_dir,
                      shape=list(images.shape), **counts)))
"""


def tiny_model_folder(directory: str) -> str:
    """The test suite's tiny config (U-Net and text encoder) with random weights, saved as a model folder."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from fakes import random_text2image

    return random_text2image().save_pretrained(directory)


def run_once(model: str, num_steps: int, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, model, str(num_steps)], env=env, capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model folder (default: a tiny random one made here)")
    parser.add_argument("--num_steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="first_generate_") as tmp:
        model = args.model or tiny_model_folder(os.path.join(tmp, "model"))
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
        env.setdefault("DIFFJAX_COMPILATION_CACHE", os.path.join(tmp, "cache"))  # empty: the first run compiles
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
        runs = [run_once(model, args.num_steps, env) for _ in range(2)]
    print(f"model: {args.model or 'tiny random (tests/fakes.py)'}, {args.num_steps} steps, 2 prompts")
    print("| process | import + load s | first generate s | cache hits | cache misses |")
    print("|---|---:|---:|---:|---:|")
    for i, r in enumerate(runs, 1):
        print(f"| {i} | {r['load_s']:.1f} | {r['generate_s']:.1f} | {r['hits']} | {r['misses']} |")
    first, second = runs
    print(f"second generate / first: {second['generate_s'] / first['generate_s']:.2f}")


if __name__ == "__main__":
    main()
