#!/usr/bin/env bash
# The emoji GPU targets in one prepared run, through the real commands (about 7 minutes on one H100):
# stage 1 with configs/stage1/emoji_gpu.yaml (2 min), test PSNR/SSIM/rFID/codes used, extraction, the
# Transformer prior with configs/stage2/emoji_transformer_gpu.yaml (2 min 15 s), sample FID of 1,000 samples
# in the training codes' class proportions (--class_mix data) beside the real-data floor (emoji feature net; also with --cfg_scale 3, and that with the temperature rising
# 1.0 -> 1.3 over the grid), and `sample --n 64` process wall.
#
#   bash benchmarks/gpu_emoji.sh OUT_DIR                    # a GPU machine, project on PYTHONPATH
#   ACC=cpu S1_TIME=00:00:00:20 S2_TIME=00:00:00:20 N=32 S2_ARGS="--data.batch_size 16" PY=.venv/bin/python bash benchmarks/gpu_emoji.sh /tmp/x
#   S1_ARGS="--model.condition_levels true" bash benchmarks/gpu_emoji.sh OUT_DIR   # VQ-VAE-2's conditioned bottom
#
# Needs data/emoji (`make data-emoji`, or benchmarks/carry_emoji.py unpack) and the emoji feature net
# (runs/feature_net/emoji.pt, from `train_feature_net --data.dataset emoji ...`). Each step has its own
# time limit, a failing step does not stop the later ones, and no step starts after BUDGET_S (460) seconds;
# results (packed after every step): OUT_DIR/log.txt and results.tar.gz.
set -u
OUT=${1:?usage: gpu_emoji.sh OUT_DIR}
R=${RUNS:-runs/gpu_emoji} FEAT=${FEATURES:-runs/feature_net/emoji.pt} BUDGET=${BUDGET_S:-460}
S1=${S1_TIME:-00:00:02:00} S2=${S2_TIME:-00:00:02:15}
source "$(dirname "$0")/_gpu_steps.sh"
step stage1 300 $PY -m stage1_vqvae.train fit --config configs/stage1/emoji_gpu.yaml --trainer.accelerator $ACC \
  --trainer.max_time $S1 --trainer.default_root_dir $R/stage1 --log.backend csv ${S1_ARGS:-}
step eval_stage1 120 $PY -m tools.evaluate stage1 --ckpt $S1CK --features $FEAT --device $DEV --json $R/eval_stage1.json
step extract 120 $PY -m stage1_vqvae.extract --ckpt $S1CK --out $R/codes --accelerator $ACC
step stage2 300 $PY -m stage2_prior.train fit --config configs/stage2/emoji_transformer_gpu.yaml --trainer.accelerator $ACC \
  --data.codes_dir $R/codes --trainer.max_time $S2 --trainer.default_root_dir $R/stage2 --log.backend csv ${S2_ARGS:-}
step eval_prior 60 $PY -m tools.evaluate prior --ckpt $S2CK --codes $R/codes --device $DEV --json $R/eval_prior.json
step sample_n 120 $PY -m tools.sample --prior $S2CK --n $N --class_mix data --out $R/samples.npz --device $DEV
step fid 120 $PY -m tools.evaluate samples --samples $R/samples.npz --data.dataset emoji --data.val_size 0 \
  --data.test_size 0 --features $FEAT --device $DEV --json $R/eval_samples.json
for i in 1 2; do
  step sample_64_$i 60 $PY -m tools.sample --prior $S2CK --n 64 --out $R/samples_64.png --device $DEV --overwrite
done
step sample_n_cfg3 120 $PY -m tools.sample --prior $S2CK --n $N --class_mix data --cfg_scale 3 --out $R/samples_cfg3.npz --device $DEV
step fid_cfg3 120 $PY -m tools.evaluate samples --samples $R/samples_cfg3.npz --data.dataset emoji --data.val_size 0 \
  --data.test_size 0 --features $FEAT --device $DEV --json $R/eval_samples_cfg3.json
step sample_n_sched 120 $PY -m tools.sample --prior $S2CK --n $N --class_mix data --cfg_scale 3 --temperature 1.0 --temperature_end 1.3 \
  --out $R/samples_sched.npz --device $DEV
step fid_sched 120 $PY -m tools.evaluate samples --samples $R/samples_sched.npz --data.dataset emoji --data.val_size 0 \
  --data.test_size 0 --features $FEAT --device $DEV --json $R/eval_samples_sched.json
cp "$R/samples_64.png" "$OUT/" 2>/dev/null
echo "== done $(date +%T)"
