# Sourced by the scripts that run on a lent GPU machine (a bare image with JAX,
# PyTorch and pytest): installs the pure-Python packages missing there, which travel
# as wheels in .whl/ (beartype, peers such as dynamax), and puts them and this
# checkout on PYTHONPATH.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
