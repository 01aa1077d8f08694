#!/bin/sh
# The trainer container's command: fetch the corpus, train, export a bundle to BUNDLE.
#
#   docker compose run --rm trainer          # or: BUNDLE=/tmp/b PRESET=tiny deploy/train-entrypoint.sh
#
# A bundle already at BUNDLE (its manifest.json) means there is nothing to do: exit 0, so
# the compose stack starts at once after the first run. Settings, all optional:
#   BUNDLE       bundle folder to write                 (default /models/default)
#   PRESET       training preset: tiny, quick or book   (default quick)
#   CACHE        corpus cache folder                    (default /cache)
#   CORPUS       a corpus file to train on instead of fetching the default one
#   RUN_DIR      checkpoint folder                      (default a fresh temp folder)
#   MAX_RECIPES  train on the first N documents only
#   PYTHON       the interpreter                        (default python)
set -eu

BUNDLE="${BUNDLE:-/models/default}"
PRESET="${PRESET:-quick}"
CACHE="${CACHE:-/cache}"
PYTHON="${PYTHON:-python}"

if [ -f "$BUNDLE/manifest.json" ]; then
    echo "trainer: bundle found at $BUNDLE; nothing to do"
    exit 0
fi

if [ -z "${CORPUS:-}" ]; then
    CORPUS="$("$PYTHON" -m training.fetch --cache "$CACHE")"
fi
RUN_DIR="${RUN_DIR:-$(mktemp -d)}"

echo "trainer: training preset $PRESET on $CORPUS"
if [ -n "${MAX_RECIPES:-}" ]; then
    "$PYTHON" -m training --data "$CORPUS" --out "$RUN_DIR" --preset "$PRESET" --max-recipes "$MAX_RECIPES"
else
    "$PYTHON" -m training --data "$CORPUS" --out "$RUN_DIR" --preset "$PRESET"
fi
"$PYTHON" -m export --checkpoint "$RUN_DIR" --out "$BUNDLE"
echo "trainer: bundle written to $BUNDLE"
