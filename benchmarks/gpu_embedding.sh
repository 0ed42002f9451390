#!/usr/bin/env bash
# The embedding benchmark on the GPU machine (device tool): ViT-B-16 at 224 px, bf16, 16 workers.
# That machine has torch but not open_clip/openslide: carry them as wheels (see the device README):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl open_clip_torch==3.3.0 timm==1.0.31 openslide-python==1.4.7 openslide-bin==4.0.1.2 \
#       tifffile==2026.3.3 imagecodecs==2026.3.6 simplejpeg==1.9.0 ftfy regex jsonschema PyYAML
# then: run(command="bash benchmarks/gpu_embedding.sh", carry=[".whl"]) and report the JSON with the device:
# read-only ÷ raw read_region (16 processes), model-only, end-to-end ÷ min(raw, model) (target ≥ 0.8).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 benchmarks/bench_embedding.py --model ViT-B-16 --device cuda --precision bf16 --workers 16 \
    --batch-size 256 --level0-px 48000 | tee "${OUT:-.}/gpu_embedding.json"
