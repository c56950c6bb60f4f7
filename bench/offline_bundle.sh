#!/usr/bin/env bash
# Bundles what bench/accuracy_gpu.sh needs on an accelerator machine that has JAX, Flax, Optax
# and Orbax but no internet: the missing pure-Python wheels (ott-jax, its jaxopt, ml-collections)
# in .whl/, pinned Flax/Optax/Orbax wheels in .whl/pin/ (a fallback when that machine's versions
# do not import with this code), the two datasets in .dsets/, and .whl/run.sh, the command to
# run there. Both folders are git-ignored through .git/info/exclude.
#
#     bash bench/offline_bundle.sh                  # here, with pip and ../shared/datasets
#     BUDGET=560 bash .whl/run.sh                   # there, from the repository root
#
# .whl/run.sh installs the wheels into /tmp/site, checks the imports (else installs the pinned
# ones), runs bench/accuracy_gpu.sh with DEADLINE_S = BUDGET minus its own set-up time, retries
# once with the pinned wheels if the grids fail in the first 150 s, and logs to $OUT/log.txt.
# PYVER names the target interpreter (default 3.12; wheels for manylinux x86-64).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
pins() { grep -E "^($1)==" requirements.txt; }
for path in /.whl/ /.dsets/; do
  grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
done
mkdir -p .whl/pin .dsets
get() {  # get DIR REQUIREMENT...
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" "$@"
}
PY=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )
jaxopt=$("$PY" -m pip show jaxopt 2>/dev/null | awk '/^Version/{print $2}' || true)
get .whl $(pins "ott-jax|ml-collections") "jaxopt==${jaxopt:-0.8.5}"
get .whl/pin $(pins "flax|optax|orbax-checkpoint")
for ds in fashion-mnist cifar10-dev; do
  if [ -d "../shared/datasets/$ds" ]; then
    cp -r "../shared/datasets/$ds" .dsets/ && chmod -R u+w .dsets
  else
    echo "offline_bundle: ../shared/datasets/$ds not found; its grid will fail there" >&2
  fi
done
cat > .whl/run.sh <<'RUN'
# Written by bench/offline_bundle.sh: run from the repository root on the accelerator machine.
T0=$(date +%s); BUDGET=${BUDGET:-560}; OUT=${OUT:-/tmp}
inst() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$@"; }
inst .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi -L 2>/dev/null; nproc
check() { python3 -c "import jax, flax, optax, ott, ml_collections, orbax.checkpoint
import wmdd_jax.pipeline, bench.accuracy
print('versions', jax.__version__, flax.__version__, optax.__version__, ott.__version__, jax.devices())"; }
PIN=0
if ! check; then echo "== import failed: pinned flax/optax/orbax"; inst .whl/pin/*.whl; PIN=1; check || exit 1; fi
run() { DEADLINE_S=$(( BUDGET - ($(date +%s) - T0) )) PY=python3 bash bench/accuracy_gpu.sh 2>&1 \
  | grep --line-buffered -v -E "oneDNN|absl::InitializeLog|^\S+ I0000" | tee -a "$OUT/log.txt"
  return "${PIPESTATUS[0]}"; }
run; rc=$?
if [ "$rc" -ne 0 ] && [ "$PIN" -eq 0 ] && [ $(( $(date +%s) - T0 )) -lt 150 ]; then
  echo "== early failure ($rc): retry with pinned flax/optax/orbax"; inst .whl/pin/*.whl; run; rc=$?
fi
echo "rc $rc after $(( $(date +%s) - T0 ))s"
RUN
du -sh .whl .dsets
