# Two commands for a fresh machine:  make demo  /  make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export GLMLORA_PROFILE ?= tiny
export GLMLORA_WORKDIR ?= $(CURDIR)/work
export PYTHONHASHSEED := 0
# One torch thread on the tiny model: its matrices are too small for threads to pay off, and on a busy 2-core machine
# two threads that wait for each other made lesson 06's memorisation step 35x slower (8.7 s vs > 300 s, same load).
ifeq ($(GLMLORA_PROFILE),tiny)
export OMP_NUM_THREADS ?= 1
endif
LANG_SET ?= zh en
NOTEBOOKS := $(foreach l,$(LANG_SET),$(sort $(wildcard notebooks/$(l)/[0-9]*.ipynb)))

.PHONY: install demo test unit browser-test lab kernel notebooks check-clean clean-work strip

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

## Unit tests, the chat box in a browser, then every notebook (both languages) under nbval, after a check that the
## committed notebooks are clean.
test: $(STAMP) check-clean
	$(BIN)/python -m pytest tests -q -p no:cacheprovider --ignore=tests/test_browser.py
	$(MAKE) --no-print-directory browser-test
	$(BIN)/python -m pytest --nbval-lax -q -p no:cacheprovider --nbval-current-env $(NOTEBOOKS)

## Lesson 06's chat box driven in JupyterLab by headless Chromium (under 2 min). Without Chromium: one line on how
## to install it, and the test is skipped; under CI (CI=true) the test runs anyway and fails.
BROWSER_INSTALL := sudo apt-get install chromium chromium-driver fonts-wqy-zenhei
browser-test: $(STAMP)
	@if [ "$$CI" = true ] || { { command -v chromium || command -v chromium-browser || command -v google-chrome; } \
	     && command -v chromedriver; } >/dev/null; then \
	  $(BIN)/python -m pytest tests/test_browser.py -q -p no:cacheprovider -rs; \
	else \
	  echo "browser test skipped: Chromium not found (install it: $(BROWSER_INSTALL))"; \
	fi

## JupyterLab from this venv, for the notebooks (as root, as in most containers, it needs --allow-root: added).
lab: $(STAMP)
	$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root)

## Register the "Python (glmlora)" kernel for a JupyterLab outside this venv (AutoDL, InternStudio, conda).
kernel: $(STAMP)
	$(BIN)/python -m ipykernel install --user --name glmlora --display-name "Python (glmlora)"

unit: $(STAMP)
	$(BIN)/python -m pytest tests -q --ignore=tests/test_browser.py

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
