# The two commands of README.md. Both create .venv on first use and install the project into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo
CLASSIFIER ?= runs/fashion_mnist_classifier
FMNIST_IDX := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
MAIN := $(BIN)/python -m experiments.main

.PHONY: demo test venv clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,reference,notebooks]'
	# The CLIP BPE vocabulary ships in openai-clip; its torch/torchvision requirements are not needed to read it.
	$(BIN)/pip install -q --no-deps openai-clip==1.0.1
	# pytorch-fid is the reference of tests/test_inception.py; its torchvision requirement cannot be met beside
	# torch's CPU build (see setup.cfg), and the test supplies the few torchvision classes it uses.
	$(BIN)/pip install -q --no-deps pytorch-fid==0.3.0
	touch $@

venv: $(BIN)/.installed

# Fashion-MNIST's IDX files come from Debian's dataset-fashion-mnist (nothing is downloaded at run time).
$(FMNIST_IDX):
	apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) \
		|| sudo apt-get install -y -q dataset-fashion-mnist

# tcmalloc (Debian's libtcmalloc-minimal4), optional: XLA:CPU's train steps run ~1.28x faster with it, because each
# call reuses the last one's freed memory instead of faulting in fresh pages (diffjax/xla_cpu.py). experiments.main
# starts itself again under it when it is installed; the tests run under it too. Without it all runs as before.
TCMALLOC_LIB := /usr/lib/$(shell uname -m)-linux-gnu/libtcmalloc_minimal.so.4
$(TCMALLOC_LIB):
	-apt-get install -y -q libtcmalloc-minimal4 || (apt-get update -q && apt-get install -y -q libtcmalloc-minimal4) \
		|| sudo apt-get install -y -q libtcmalloc-minimal4

# The feature network of the metrics (trained once, 2-4 min), then the text-to-image model (6-16 min),
# then its evaluation: a grid for every class and the metrics (WORKDIR/eval/step_*/); last, the model folder
# WORKDIR/model that README's Python example loads.
$(CLASSIFIER)/metrics.json: | venv $(FMNIST_IDX) $(TCMALLOC_LIB)
	$(MAIN) --mode=train_classifier --config=experiments/configs/fashion_mnist_classifier.py --workdir=$(CLASSIFIER)

demo: venv $(FMNIST_IDX) $(TCMALLOC_LIB) $(CLASSIFIER)/metrics.json
	$(MAIN) --config=experiments/configs/fashion_mnist.py --workdir=$(WORKDIR)
	$(MAIN) --mode=eval --config=experiments/configs/fashion_mnist.py --workdir=$(WORKDIR) \
		--config.evaluation.classifier_workdir=$(CLASSIFIER)
	$(MAIN) --mode=export --workdir=$(WORKDIR) --out=$(WORKDIR)/model

# The notebooks (tests/test_notebooks.py) train on the real Fashion-MNIST files. Two pytest-xdist workers, a test
# file each at a time (TEST_WORKERS=0: all in this process); tests/conftest.py builds what they share once.
TEST_WORKERS ?= 2
test: venv $(FMNIST_IDX) $(TCMALLOC_LIB)
	LD_PRELOAD="$$($(BIN)/python -c 'from diffjax import xla_cpu; print(xla_cpu.tcmalloc_path() or "")') $$LD_PRELOAD" \
		$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
