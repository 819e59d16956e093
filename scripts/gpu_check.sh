#!/usr/bin/env bash
# The CUDA check run on a lent GPU machine (no registry there): the wheels and a redis-server
# build travel in .whl/ (see docs/benchmarks.md). Writes reports to $OUT.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . || exit 1
REPO=$PWD
export PYTHONPATH=/tmp/site PATH="$REPO/.whl/redis:$PATH" LD_LIBRARY_PATH="$REPO/.whl/redis"
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
redis-server --version || exit 1
export FLASHRECOVERY_RUNTIME_DIR=/tmp/frrun FLASHRECOVERY_SIDECAR__WORKER_NICE=0
# From outside the checkout: its flashrecovery/ folder would shadow the installed package.
cd /tmp
for dev in ${DEVICES:-cuda cpu}; do
  for fault in ${FAULTS:-process-crash node-crash}; do
    timeout ${PER_RUN:-170} python3 -m flashrecovery demo --fault $fault --device $dev --steps 30 --at-step 10 \
      ${VERIFY:---verify} --quiet --json "$OUT/demo_${dev}_${fault}.json" 2>&1 | grep -v '^{' | tail -25
  done
done
