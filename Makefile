# Two commands for a fresh machine:  make demo  /  make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export GLMLORA_PROFILE ?= tiny
export GLMLORA_WORKDIR ?= $(CURDIR)/work
export PYTHONHASHSEED := 0
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))

.PHONY: install demo test unit notebooks check-clean clean-work strip

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

## Run the whole course headless on the tiny default; executed copies go to work/executed/.
demo: $(STAMP)
	$(BIN)/python tools/run_notebooks.py --out $(GLMLORA_WORKDIR)/executed $(NOTEBOOKS)

## Unit tests, then every notebook under nbval, then a check that notebooks are committed clean.
test: $(STAMP) check-clean
	$(BIN)/python -m pytest tests -q -p no:cacheprovider
	$(BIN)/python -m pytest --nbval-lax -q -p no:cacheprovider --nbval-current-env $(NOTEBOOKS)

unit: $(STAMP)
	$(BIN)/python -m pytest tests -q

check-clean: $(STAMP)
	$(BIN)/python tools/strip_notebooks.py --check notebooks

strip: $(STAMP)
	$(BIN)/python tools/strip_notebooks.py notebooks

clean-work:
	rm -rf work
