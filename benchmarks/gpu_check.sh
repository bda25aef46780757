#!/usr/bin/env bash
# The GPU check for issue 9, one script of at most ~5 minutes on one CUDA GPU:
#   1. the CUDA-marked tests (bf16/fp16 resume, prefetcher, EMA, SyncBN on one GPU...);
#   2. bench_train.py on PSPNet-ResNet50 at 512x512, batch 8: fp32, bf16, bf16 + channels_last,
#      bf16 + compile, one JSON record per variant in $OUT/bench_train.jsonl (or ./gpu_check.jsonl).
# Goals: full loop >= 0.95 of the bare loop; bf16 >= 1.5x fp32.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
timeout 120 python -m pytest -q -x -k "cuda or bf16 or fp16 or ema or prefetch or sync" tests/test_speed_options.py tests/test_build.py tests/test_distributed.py || echo "CUDA tests: FAILED"
timeout 150 python benchmarks/bench_train.py --models psp_r50_512 --variants fp32,bf16,bf16_channels_last,bf16_compile \
  --rounds 2 --json "$out/gpu_check.jsonl" loader.num_workers=8
python - "$out/gpu_check.jsonl" <<'PY'
import json, sys
recs = {r["variant"]: r for r in map(json.loads, open(sys.argv[1]))}
for name, r in recs.items():
    print(f"{name:<20} full {r['full_img_s']:7.1f} img/s  bare {r['bare_img_s']:7.1f}  ratio {r['ratio']:.3f}  peak {r['peak_mem_mib']} MiB")
if "fp32" in recs and "bf16" in recs:
    print(f"bf16 / fp32 full-loop speed-up: {recs['bf16']['full_img_s'] / recs['fp32']['full_img_s']:.2f} (goal >= 1.5)")
PY
