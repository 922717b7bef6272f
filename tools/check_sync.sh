#!/usr/bin/env bash
# Fails if nbdev_clean, nbdev_export or the README generator change anything: the library, the README and the
# notebooks must already be what the notebooks make of them.
set -euo pipefail
venv=${1:-.venv}
snap() {
  { git status --porcelain -- nbs fastai_bayes README.md
    git diff -- nbs fastai_bayes README.md
    git ls-files --others --exclude-standard -- nbs fastai_bayes | sort | xargs -r cat; } | sha1sum
}
before=$(snap)
"$venv/bin/nbdev_clean" >/dev/null
"$venv/bin/nbdev_export"
"$venv/bin/python" tools/readme.py
after=$(snap)
if [ "$before" != "$after" ]; then
  echo "OUT OF SYNC: nbdev_clean / nbdev_export / tools/readme.py changed these files:" >&2
  git status --porcelain -- nbs fastai_bayes README.md >&2
  echo "The notebooks are the source: export (make export) and commit the notebooks and the generated files together." >&2
  exit 1
fi
echo "sync: notebooks, library and README agree"
