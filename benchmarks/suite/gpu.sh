#!/usr/bin/env bash
# The performance suite on one GPU, in bfloat16, within 5 minutes: diffjax's train step and sampling against
# diffusers' PyTorch U-Net on the same card, at the small, ddpm_cifar10 and sd (64x64x4 latents) presets
# (benchmarks/suite/suite_jobs.py SPECS), with the card's name and the versions printed first.
#
#   benchmarks/suite/gpu.sh --wheels          # here, where pip reaches PyPI: the wheels the GPU machine lacks -> .whl/
#   benchmarks/suite/gpu.sh [OUTDIR]          # there, from the repo root: install .whl/ (if present) and measure
#
# The GPU machine this was prepared for (see docs/performance.md) has Python 3.12 with jax/jaxlib and their CUDA
# plugin, torch, optax, chex, numpy, but transformers 5 (no Flax CLIP classes) and none of diffusers,
# ml_collections, grain or tensorflow-datasets; the wheels below fill that in (~29 MiB, no CUDA wheels among them).
# Environment: SPECS (default "small ddpm_cifar10 sd"), ROUNDS (3), ROUND_SECONDS (1.0), COMPILE=1 to add
# torch.compile jobs (minutes of compilation per preset on a GPU: over the 5-minute budget), MEMORY=0 to skip the
# memory analysis at the end.
set -uo pipefail
cd "$(dirname "$0")/../.."

WHEELS=(transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 diffusers==0.39.0 ml_collections==1.1.0
        ftfy==6.3.1 wcwidth==0.9.4 flax==0.12.8 orbax-checkpoint==0.12.8 grain==0.2.18 tensorflow-datasets==4.9.10
        tensorflow-metadata==1.21.0)

if [[ "${1:-}" == "--wheels" ]]; then
  PY_VERSION="${PY_VERSION:-3.12}"
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  exec "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
fi

OUTDIR="${1:-${OUT:-gpu-results}}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/diffjax-site \
    .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/diffjax-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1

JOBS="matmul peak,diffjax train,pytorch train,diffjax Text2Image,diffjax sampler,pytorch sample"
[[ "${COMPILE:-0}" == "1" ]] && JOBS="$JOBS,pytorch+compile train,pytorch+compile sample"
status=0
for spec in ${SPECS:-small ddpm_cifar10 sd}; do
  echo "=== $spec ==="
  "$PY" benchmarks/suite/run.py --spec "$spec" --dtype bfloat16 --sections train,sample --jobs "$JOBS" \
    --rounds "${ROUNDS:-3}" --round-seconds "${ROUND_SECONDS:-1.0}" --out "$OUTDIR/gpu_$spec.json" \
    2>&1 | tee "$OUTDIR/gpu_$spec.log" || status=1
done
# Last (the timings above are already written): the train step's peak memory with and without remat from XLA's
# memory analysis on this backend (on XLA:CPU 65% less at batch 64; see docs/lab_notebook.md).
[[ "${MEMORY:-1}" == "1" ]] && { "$PY" benchmarks/suite/run.py --spec matched --sections memory \
  --out "$OUTDIR/gpu_memory.json" 2>&1 | tee "$OUTDIR/gpu_memory.log" || status=1; }
exit $status
