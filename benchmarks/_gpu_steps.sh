# Shared by benchmarks/gpu_*.sh (sourced, not run): the environment, the per-step runner and the packing.
# The caller sets OUT, R (its runs folder) and BUDGET (seconds after which no step starts) first.
PY=${PY:-python3} ACC=${ACC:-gpu} N=${N:-1000} LAST_RC=0
DEV=$([ "$ACC" = gpu ] && echo cuda || echo cpu)
mkdir -p "$OUT" "$R"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
T0=$EPOCHREALTIME
S1CK=$R/stage1/latest/checkpoints/last.ckpt
S2CK=$R/stage2/latest/checkpoints/best.ckpt
pack() { tar czf "$OUT/results.tar.gz" --exclude='*.ckpt' --exclude='*.npy' --exclude='*.npz' "$R" 2>/dev/null; }
step() {  # step NAME LIMIT_S CMD...: run (unless the budget is spent), print wall time and exit code, pack
  local name=$1 limit=$2 t0=$EPOCHREALTIME rc left; shift 2
  left=$(awk -v a="$T0" -v b="$t0" -v B="$BUDGET" 'BEGIN{printf "%d", B-(b-a)}')
  if [ "$left" -le 5 ]; then echo "-- $name skipped: the ${BUDGET}s budget is spent"; return; fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $(date +%T) $name: $*"
  timeout "$limit" "$@"; rc=$? LAST_RC=$rc
  echo "-- $name rc=$rc wall_s=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.2f", b-a}')"
  pack
}
# The environment first, and nothing else if it is incomplete: without jsonargparse[signatures] (its extras
# docstring_parser and typeshed_client) or constriction every later step fails after its start-up, minutes
# of device time for nothing (the second H200 run's first call).
step env 60 $PY -c "import torch, pytorch_lightning as pl, constriction; \
from lightning_utilities.core.imports import RequirementCache as R; r = R('jsonargparse[signatures]>=4.27.7'); \
assert r, str(r); print(torch.__version__, pl.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
[ "$LAST_RC" = 0 ] || { echo "-- the environment is incomplete (above): nothing else is run"; exit 1; }
