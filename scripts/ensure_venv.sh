# Sourced by run_local.sh and run_tests.sh: creates or reuses .venv and
# installs the project with its local, test and plot extras when setup.py changed.
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
stamp=.venv/.installed-$(sha256sum setup.py | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "installing dependencies into .venv (first run takes a few minutes)" >&2
  {
    python -m pip install --upgrade pip &&
    # torch first and pinned, so nothing resolves it to a CUDA build.
    python -m pip install "torch==2.13.0" &&
    python -m pip install -e ".[local,test,plot]"
  } > .venv/install.log 2>&1 || { tail -40 .venv/install.log >&2; echo "install failed; see .venv/install.log" >&2; exit 1; }
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# Flink's job server and Prism, fetched or built once into caches outside the repository (docs/flink.md).
scripts/fetch_flink.sh > /dev/null || echo "warning: no Flink job server: the Flink tests will fail" >&2
scripts/fetch_prism.sh > /dev/null || echo "warning: no Prism binary: the Prism tests will fail" >&2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
