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

# The feature network of the metrics (trained once, 2-4 min), then the text-to-image model (8-16 min),
# then its evaluation: a grid for every class and the metrics (WORKDIR/eval/step_*/).
$(CLASSIFIER)/metrics.json: | venv $(FMNIST_IDX)
	$(MAIN) --mode=train_classifier --config=experiments/configs/fashion_mnist_classifier.py --workdir=$(CLASSIFIER)

demo: venv $(FMNIST_IDX) $(CLASSIFIER)/metrics.json
	$(MAIN) --config=experiments/configs/fashion_mnist.py --workdir=$(WORKDIR)
	$(MAIN) --mode=eval --config=experiments/configs/fashion_mnist.py --workdir=$(WORKDIR) \
		--config.evaluation.classifier_workdir=$(CLASSIFIER)

# The notebooks (tests/test_notebooks.py) train on the real Fashion-MNIST files.
test: venv $(FMNIST_IDX)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
