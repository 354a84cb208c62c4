# (The full GPU proof is benchmarks/gpu_proof.py; see docs/gpu.md.)
# GPU smoke run of the whole CLI with the tiny test models (hf generation in bf16, finetune with
# bf16 + 8-bit AdamW, merge, evaluate), for a session lent the `device` GPU machine. That machine
# has torch/transformers/peft but not math-verify or bitsandbytes: download their wheels into
# .whl/ first (see the device tool's README; math-verify, latex2sympy2-extended,
# antlr4-python3-runtime, bitsandbytes), then run `bash scripts/gpu_smoke.sh` there, carrying .whl.
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests PYTHONUNBUFFERED=1 TQDM_DISABLE=1
python3 -c "import torch, transformers, peft, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, torch.cuda.get_device_name())"
python3 -c "from helpers import build_tiny; from pathlib import Path; build_tiny('qwen2', Path('/tmp/tq')); build_tiny('gemma3', Path('/tmp/tg'))" 2>&1 | tail -2
python3 -m q2g.cli generate --backend hf --teacher /tmp/tq --data-dir packaged --limit 8 --max-new-tokens 32 --samples-per-problem 2 --out /tmp/gen-hf 2>&1 | tail -12
python3 -m q2g.cli generate --backend reference --teacher reference --data-dir packaged --limit 40 --out /tmp/gen-ref 2>&1 | tail -8
python3 -m q2g.cli finetune --base-model /tmp/tg --traces /tmp/gen-ref --out /tmp/ft --epochs 2 --max-seq-len 256 --eval-limit 8 --eval-max-new-tokens 16 --ppl-max-tokens 2048 --data-dir packaged --batch-size 8 --grad-accum 2 2>&1 | grep -v "it/s\]" | tail -25
cat /tmp/ft/report.md | head -30
python3 -m q2g.cli merge --adapter /tmp/ft/final --out /tmp/merged 2>&1 | tail -5
python3 -m q2g.cli evaluate --model /tmp/tg --adapter /tmp/ft/final --split /tmp/gen-ref/split.json --data-dir packaged --eval-limit 8 --max-new-tokens 16 --ppl-max-tokens 2048 --out /tmp/ev 2>&1 | tail -15
