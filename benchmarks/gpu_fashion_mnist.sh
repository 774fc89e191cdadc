#!/usr/bin/env bash
# The speed issue's GPU targets in one prepared run, through the real commands (about 5 minutes on one
# H100): stage 1 with configs/stage1/fashion_mnist_gpu.yaml (60 s of training; images/s and test PSNR),
# extract_codes (images/s), the Transformer prior with configs/stage2/fashion_mnist_transformer_gpu.yaml
# (60 s; code maps/s and test bits/code against the CPU demo's 5.356), `sample --n 64` process wall, sample
# FID of 1,000 samples (`make demo`'s guidance and temperature schedule), and the masked-vs-autoregressive
# sampling speed (benchmarks/maskgit_speed.py), and the commands' start-up beside `import torch`
# (benchmarks/startup.py).
#
#   bash benchmarks/gpu_fashion_mnist.sh OUT_DIR             # a GPU machine, project on PYTHONPATH
#   ACC=cpu S1_TIME=00:00:00:20 S2_TIME=00:00:00:20 N=32 S2_ARGS="--data.batch_size 16" PY=.venv/bin/python bash benchmarks/gpu_fashion_mnist.sh /tmp/x
#
# Needs Fashion-MNIST (data/fashion_mnist or Debian's dataset-fashion-mnist) and its feature net
# (runs/feature_net/fashion_mnist.pt). Each step has its own time limit, a failing step does not stop the
# later ones, and no step starts after BUDGET_S (290) seconds; results (packed after every step): OUT_DIR/log.txt
# and results.tar.gz.
set -u
OUT=${1:?usage: gpu_fashion_mnist.sh OUT_DIR}
R=${RUNS:-runs/gpu_fashion_mnist} FEAT=${FEATURES:-runs/feature_net/fashion_mnist.pt} BUDGET=${BUDGET_S:-290}
S1=${S1_TIME:-00:00:01:00} S2=${S2_TIME:-00:00:01:00}
source "$(dirname "$0")/_gpu_steps.sh"
step stage1 150 $PY -m stage1_vqvae.train fit --config configs/stage1/fashion_mnist_gpu.yaml --trainer.accelerator $ACC \
  --trainer.max_time $S1 --trainer.default_root_dir $R/stage1 --log.backend csv
step eval_stage1 60 $PY -m tools.evaluate stage1 --ckpt $S1CK --features $FEAT --device $DEV --json $R/eval_stage1.json
step extract 60 $PY -m stage1_vqvae.extract --ckpt $S1CK --out $R/codes --accelerator $ACC --batch_size 8192
step stage2 150 $PY -m stage2_prior.train fit --config configs/stage2/fashion_mnist_transformer_gpu.yaml \
  --trainer.accelerator $ACC --data.codes_dir $R/codes --trainer.max_time $S2 --trainer.default_root_dir $R/stage2 \
  --log.backend csv ${S2_ARGS:-}
step eval_prior 60 $PY -m tools.evaluate prior --ckpt $S2CK --codes $R/codes --device $DEV --json $R/eval_prior.json
for i in 1 2; do
  step sample_64_$i 60 $PY -m tools.sample --prior $S2CK --n 64 --out $R/samples_64.png --device $DEV --overwrite
done
step sample_n 60 $PY -m tools.sample --prior $S2CK --n $N --cfg_scale 4 --temperature 1.0 --temperature_end 1.4 \
  --out $R/samples.npz --device $DEV
step fid 60 $PY -m tools.evaluate samples --samples $R/samples.npz --ckpt $S1CK --features $FEAT --device $DEV \
  --json $R/eval_samples.json
# Where `sample --n 64`'s process wall goes on this machine (the ≤ 5-s target): each model command beside a
# bare `import torch`, fresh processes, default-config checkpoints with random weights.
step startup 120 $PY benchmarks/startup.py --repeats 3 --json $R/startup.json
step maskgit_speed 90 $PY benchmarks/maskgit_speed.py --device $DEV --threads 0 --repeats 2 --grids emoji_16x16 --json $R/maskgit_speed.json
cp "$R/samples_64.png" "$OUT/" 2>/dev/null
echo "== done $(date +%T)"
