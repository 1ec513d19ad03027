#!/bin/sh
# The one install step both images run (and a test runs in a fresh virtualenv):
#   install.sh VENV EXTRA SRC
# creates VENV, installs SRC with the given extra ("trainer" or "operator") at the versions
# pinned in pyproject.toml, and checks that the entrypoint starts.
set -eu
venv=$1 extra=$2 src=$3
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet "$src[$extra]"
"$venv/bin/tinv" --help >/dev/null
"$venv/bin/tinv" "$( [ "$extra" = operator ] && echo operator || echo train )" --help >/dev/null
echo "installed tinv[$extra] into $venv"
