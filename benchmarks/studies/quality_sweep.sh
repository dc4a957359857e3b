#!/bin/bash
# Train and evaluate several Fashion-MNIST recipes side by side, in parallel processes (one accelerator can
# run them all; on 2 CPU cores run one at a time), and print each run's conditioning accuracy and Fréchet
# distance. The figures of docs/lab_notebook.md ("choices at the demo budget", "the longer budget") came
# from this script on one H200:
#
#   LONG_STEPS=6000 LONG_EVALS="1500 3000 4500 6000" DEMO_STEPS=600 GUIDANCE="5 7.5" \
#   BASE="--config.model.unet.attention_levels=(2,)" \
#   SWEEP="v1:--config.optim.learning_rate=1e-3 v2:--config.optim.learning_rate=2e-3 \
#          v3:--config.optim.learning_rate=3e-3 e2:--config.optim.learning_rate=2e-3,--config.diffusion.prediction_type=eps" \
#   benchmarks/studies/quality_sweep.sh
#
# (run before the demo config adopted those choices; with today's experiments/configs/fashion_mnist.py, v3 is
# the config itself and "long" is experiments/configs/fashion_mnist_long.py.)
#
# Environment: SWEEP: runs "name:override,override,..." of DEMO_STEPS steps each, evaluated at their last step;
# LONG_STEPS (0: none) and LONG_EVALS: one longer run, checkpointed every LONG_STEPS/4 steps and evaluated at
# the steps listed; BASE: overrides for every run; GUIDANCE: guidance scales of each evaluation; RUNS: where
# the workdirs go (default /tmp/runs); CLASSIFIER: the feature network's workdir; PY: the Python to use.
set -u
R=${RUNS:-/tmp/runs}; mkdir -p "$R"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxcache} JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
PY=${PY:-python3}
CFG=experiments/configs/fashion_mnist.py
COMMON="--config.evaluation.classifier_workdir=${CLASSIFIER:-$PWD/runs/fashion_mnist_classifier} --config.training.progress_bar=False"
BASE=${BASE:-}

summary() {  # metrics.json -> one line
  $PY -c "import json, sys; m = json.load(open(sys.argv[1])); print('acc %.4f rel %.4f fd %.3f floor %.3f' % (
      m['conditioning_accuracy'], m['relative_conditioning_accuracy'], m['fd'], m['fd_train_floor']))" "$1" 2>&1 | tail -1
}

train_eval() {  # name steps "eval steps" overrides...
  local name=$1 steps=$2 evals=$3; shift 3
  local t0 s g rc m
  t0=$(date +%s)
  $PY -m experiments.main --config=$CFG --workdir="$R/$name" $COMMON --config.training.num_steps="$steps" "$@" \
    > "$R/$name.train.log" 2>&1
  echo "[$name] trained rc=$? in $(( $(date +%s) - t0 )) s"
  for s in $evals; do for g in ${GUIDANCE:-5}; do
    $PY -m experiments.main --mode=eval --config=$CFG --workdir="$R/$name" $COMMON --step="$s" --guidance_scale="$g" \
      > "$R/$name.eval$s.w$g.log" 2>&1
    rc=$?; m="$R/$name/eval/step_$(printf %06d "$s")/metrics.json"
    echo "[$name] step $s guidance $g (rc=$rc, $(( $(date +%s) - t0 )) s): $(summary "$m")"
    cp "$m" "$R/$name.metrics$s.w$g.json" 2>/dev/null
  done; done
}

$PY -c "from diffjax.data.fashion_mnist import prepare_fashion_mnist; prepare_fashion_mnist(data_dir='~/tensorflow_datasets')" \
  > "$R/prepare.log" 2>&1 || { tail -3 "$R/prepare.log"; exit 1; }
pids=""
if [ "${LONG_STEPS:-0}" != 0 ]; then
  # shellcheck disable=SC2086
  train_eval long "$LONG_STEPS" "${LONG_EVALS:-$LONG_STEPS}" $BASE --config.training.checkpoint_every=$((LONG_STEPS / 4)) \
    --config.training.sample_every="$LONG_STEPS" --config.training.keep_checkpoints=8 &
  pids="$pids $!"
fi
for spec in ${SWEEP:-}; do
  name=${spec%%:*}; ov=${spec#*:}
  # shellcheck disable=SC2086
  train_eval "$name" "${DEMO_STEPS:-600}" "${DEMO_STEPS:-600}" $BASE ${ov//,/ } &
  pids="$pids $!"
done
# shellcheck disable=SC2086
wait $pids
grep -h -E "Traceback|[A-Za-z]+Error:" "$R"/*.log | sort | uniq -c | head -20
