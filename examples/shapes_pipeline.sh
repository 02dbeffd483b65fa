#!/usr/bin/env bash
# The main job: all three stages on the built-in shapes data, on the CPU, ending with a grid of samples.
#   stage 1  main.py                                  VQ-VAE-2, 32x32 images -> 4x4 top + 8x8 bottom codes
#   stage 2  train_pixelcnn_vqvae2.py                 hierarchical PixelCNN prior over those codes
#   stage 3  generate_samples_pixelcnn_vqvae2.py      64 samples -> runs/shapes/samples/samples.png
#   evaluate evaluate.py                              bits/dim, and FID etc. of 1000 samples in the classifier space
# Set OUT to write elsewhere. Installs requirements.txt first (a no-op when they are present).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/shapes}
python -m pip install -q -r requirements.txt
export WANDB_MODE=${WANDB_MODE:-disabled}
start=$(date +%s)

python main.py --arch vq_vae2 --dataset shapes --preset small --num_embeddings 64 \
  --epochs 5 --num_train 12800 --num_val 1000 --batch_size 64 --lr 1e-3 --out_dir "$OUT/vq_vae2"
python train_pixelcnn_vqvae2.py --vqvae2_checkpoint "$OUT/vq_vae2/best.pth" --preset small \
  --epochs 4 --batch_size 64 --lr 1e-3 --out_dir "$OUT/prior"
python generate_samples_pixelcnn_vqvae2.py --vqvae2_checkpoint "$OUT/vq_vae2/best.pth" \
  --prior_checkpoint "$OUT/prior/best.pth" --num_samples 64 --out_dir "$OUT/samples"
python evaluate.py --vq_checkpoint "$OUT/vq_vae2/best.pth" --prior_checkpoint "$OUT/prior/best.pth" \
  --num_samples 1000 --out_dir "$OUT/eval"

echo "pipeline finished in $(( $(date +%s) - start )) s; samples: $OUT/samples/samples.png"
