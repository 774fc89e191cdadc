#!/usr/bin/env bash
# The anomaly issue's GPU version in one prepared run: the one-class Fashion-MNIST protocol for all 10
# classes (benchmarks/anomaly_one_class.py, the CPU budget's steps unless ONE_CLASS_ARGS says otherwise, so
# the AUROCs compare with the CPU run's), every score's AUROC per class and the mean, then the
# out-of-distribution sets with an anomaly net trained on all of Fashion-MNIST through train_anomaly_net
# (two nets by default; when a demo prior is there; scored on the CPU). Expected 6-8 minutes on one H100:
# not yet run on one.
#
#   bash benchmarks/gpu_anomaly.sh OUT_DIR                   # a GPU machine, project on PYTHONPATH
#   ACC=cpu ONE_CLASS_ARGS="--classes 0 --stage1_steps 20 --prior_steps 20 --transform_steps 20 --limit 500" \
#     PY=.venv/bin/python bash benchmarks/gpu_anomaly.sh /tmp/x        # the CPU smoke run of the same script
#
# Needs Fashion-MNIST (data/fashion_mnist or Debian's dataset-fashion-mnist). Each step has its own time
# limit, no step starts after BUDGET_S (540) seconds; results (packed after every step): OUT_DIR/log.txt
# and results.tar.gz.
set -u
OUT=${1:?usage: gpu_anomaly.sh OUT_DIR}
R=${RUNS:-runs/gpu_anomaly} BUDGET=${BUDGET_S:-540}
PRIOR=${PRIOR:-runs/stage2_transformer/latest/checkpoints/best.ckpt}
source "$(dirname "$0")/_gpu_steps.sh"
step one_class 480 $PY benchmarks/anomaly_one_class.py --accelerator $ACC --set prior.model.size=tiny \
  ${ONE_CLASS_ARGS:-} --json $R/one_class.json
step anomaly_net 120 $PY -m tools.train_anomaly_net --data.dataset fashion_mnist --device $DEV \
  --steps ${NET_STEPS:-1000} --out $R/anomaly_net.pt --overwrite
if [ -f "$PRIOR" ]; then
  step ood 180 $PY benchmarks/anomaly_ood.py --prior $PRIOR --anomaly_net $R/anomaly_net.pt --json $R/ood.json
fi
echo "== done $(date +%T)"
