# The two commands of README.md. Both create .venv on first use and install the project into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo

.PHONY: demo test venv clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,reference]'
	# The CLIP BPE vocabulary ships in openai-clip; its torch/torchvision requirements are not needed to read it.
	$(BIN)/pip install -q --no-deps openai-clip==1.0.1
	# pytorch-fid is the reference of tests/test_inception.py; its torchvision requirement cannot be met beside
	# torch's CPU build (see setup.cfg), and the test supplies the few torchvision classes it uses.
	$(BIN)/pip install -q --no-deps pytorch-fid==0.3.0
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m experiments.smoke --workdir=$(WORKDIR)

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
