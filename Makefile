# Two commands for a fresh machine:  make demo  /  make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export GLMLORA_PROFILE ?= tiny
export GLMLORA_WORKDIR ?= $(CURDIR)/work
export PYTHONHASHSEED := 0
LANG_SET ?= zh en
NOTEBOOKS := $(foreach l,$(LANG_SET),$(sort $(wildcard notebooks/$(l)/[0-9]*.ipynb)))

.PHONY: install demo test unit notebooks check-clean clean-work strip

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name glmlora --display-name "Python (glmlora)" >/dev/null
	touch $(STAMP)

install: $(STAMP)

## Run the whole course headless on the tiny default; executed copies go to work/executed/{zh,en}/.
demo: $(STAMP)
	$(BIN)/python tools/run_notebooks.py --out $(GLMLORA_WORKDIR)/executed $(NOTEBOOKS)

## Unit tests, then every notebook (both languages) under nbval, after a check that the committed notebooks are clean.
test: $(STAMP) check-clean
	$(BIN)/python -m pytest tests -q -p no:cacheprovider
	$(BIN)/python -m pytest --nbval-lax -q -p no:cacheprovider --nbval-current-env $(NOTEBOOKS)

unit: $(STAMP)
	$(BIN)/python -m pytest tests -q

## Rebuild notebooks/zh and notebooks/en from the bilingual sources in notebooks/src.
notebooks: $(STAMP)
	$(BIN)/python tools/build_notebooks.py

## What is committed (git's index): built from notebooks/src, without outputs. Notebooks you ran and saved do not count.
check-clean: $(STAMP)
	$(BIN)/python tools/build_notebooks.py --check
	$(BIN)/python tools/strip_notebooks.py --check notebooks

## Remove outputs from the notebooks on disk (after running them in JupyterLab).
strip: $(STAMP)
	$(BIN)/python tools/strip_notebooks.py notebooks

clean-work:
	rm -rf work
