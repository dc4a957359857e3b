"""Input pipeline cost: preparing captioned Fashion-MNIST, and batches/s read through grain.

    .venv/bin/python benchmarks/studies/input_pipeline.py                 # prepare into a fresh temp dir
    .venv/bin/python benchmarks/studies/input_pipeline.py --data_dir=DIR  # reuse a prepared dataset

Prints, for the real Fashion-MNIST (the IDX files of Debian's dataset-fashion-mnist):
  * prepare: IDX -> array_record tfds dataset (70k PNG-encoded images, both splits);
  * decode:  first decode of the train split into memory (later runs load the kept copy);
  * batches/s and CPU ms per batch: in memory (the default for small splits, data.cache_max_mb)
    and streamed from the array_record files (data.cache_max_mb=0), one thread.

Global batch 64, random flip on, CLIP tokenizer (captions cached after first use). Figures: docs/lab_notebook.md
("The input pipeline is not the bottleneck").
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="", help="prepared data dir to reuse (default: a fresh temp dir)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()

    from diffjax import data
    from diffjax.text import TextEncoder

    fresh = not args.data_dir
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="diffjax-bench-")
    try:
        start = time.perf_counter()
        data.prepare_fashion_mnist(data_dir)
        print(f"prepare: {time.perf_counter() - start:.1f} s ({'fresh' if fresh else 'reused'} {data_dir})")

        encoder, _ = TextEncoder.from_config("tiny")
        config = data.default_data_config()
        config.data_dir, config.random_flip, config.num_threads = data_dir, True, 1
        for label, cache_mb in (("in memory", 2048), ("streamed", 0)):
            config.cache_max_mb = cache_mb
            start = time.perf_counter()
            it = data.make_dataset(
                config, encoder, split="train", global_batch_size=args.batch_size, seed=0,
                process_index=0, process_count=1,
            )
            next(it)
            setup = time.perf_counter() - start
            n = args.batches if cache_mb else max(20, args.batches // 10)
            wall, cpu = time.perf_counter(), _cpu()
            for _ in range(n):
                next(it)
            wall, cpu = time.perf_counter() - wall, _cpu() - cpu
            print(
                f"{label}: setup {setup:.2f} s; {n / wall:.1f} batches/s, {1e3 * cpu / n:.1f} ms CPU per batch "
                f"of {args.batch_size}"
            )
    finally:
        if fresh:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
