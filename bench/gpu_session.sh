#!/usr/bin/env bash
# One pass over every GPU path, for a session that has an NVIDIA GPU: build against the machine's
# CUDA torch, run the Triton kernels' tests on CUDA tensors (no interpreter), then benchmark each
# family on CUDA. Prints everything; writes RESULTS.md sections for the cuda device where a
# script supports it. Usage: bash bench/gpu_session.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
QUICK=${1:-}

$PY - <<'PYEOF' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
PYEOF

# Build in place (no isolated env: use the machine's torch), CUDA C++ included where present.
$PY -m pip install -q --no-build-isolation --no-deps -e . || exit 1

# Correctness of every GPU path on the device.
TRITON_INTERPRET=0 $PY -m pytest -q -x \
  tests/ops/test_lstm_triton.py tests/ops/test_cross_entropy.py tests/ops/test_clip.py \
  tests/ops/test_int8.py tests/ops/test_int8_lstm.py tests/ops/test_distill.py 2>&1 | tail -15

# Module-level drop-in checks on CUDA against cuDNN.
$PY - <<'PYEOF'
import torch, pyengine
torch.manual_seed(0)
for kw in [dict(), dict(num_layers=2, bidirectional=True), dict(proj_size=8, num_layers=2)]:
    ref = torch.nn.LSTM(32, 64, **kw).cuda()
    ours = pyengine.nn.LSTM(32, 64, **kw).cuda()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(20, 7, 32, device="cuda", requires_grad=True)
    a, b = ours(x)[0], ref(x)[0]
    ga = torch.autograd.grad(a.sum(), [x, *ours.parameters()])
    gb = torch.autograd.grad(b.sum(), [x, *ref.parameters()])
    err = max([(a - b).abs().max().item()] + [(p - q).abs().max().item() for p, q in zip(ga, gb)])
    print("nn.LSTM cuda vs cuDNN", kw, "max abs diff", f"{err:.2e}")
PYEOF

# The int8 LSTM on CUDA (a composite of the int8_linear Triton kernel) against the CPU kernel.
$PY - <<'PYEOF'
import torch, pyengine
torch.manual_seed(0)
lm = pyengine.LSTMLanguageModel(256, 64, 128, 2).eval()
for act in ("dynamic", "none"):
    q = pyengine.quantize(lm, act=act, inplace=False)
    tokens = torch.randint(0, 256, (4, 33))
    with torch.no_grad():
        cpu = q(tokens)[0]
        gpu = q.cuda()(tokens.cuda())[0].cpu()
    print("int8 LM cuda vs cpu", act, "max abs diff", f"{(gpu - cpu).abs().max().item():.2e}")
PYEOF

# The application on the GPU: the Trainer at each precision (the step must not wait for the
# device: count host syncs with torch.cuda.set_sync_debug_mode), then the demo's two sides.
$PY - <<'PYEOF'
import torch
from pyengine.data import ByteTokenizer, LanguageModelDataset, default_corpus
from pyengine.models import LSTMLanguageModel
from pyengine.train import Trainer
data = LanguageModelDataset.from_text(default_corpus(200_000), ByteTokenizer(), 16, 64)
batches = list(data.batches())[:8]
for precision in ("fp32", "bf16", "fp16"):
    torch.manual_seed(0)
    t = Trainer(LSTMLanguageModel(256, 128, 256, 2), device="cuda", precision=precision,
                loggers=[], progress=False, log_grad_norms=False, log_every=1000)
    t.fit(data.__class__.from_text(default_corpus(50_000), ByteTokenizer(), 16, 64))
    torch.cuda.set_sync_debug_mode("warn")
    for b in batches:
        loss = t.train_step(b, stateful=True)
    torch.cuda.set_sync_debug_mode(0)
    print("Trainer cuda", precision, "loss", float(loss), "eval", t.evaluate(data)["loss"])
PYEOF
timeout 900 $PY -m pyengine demo --device cuda --steps 100 --domain-steps 20 \
  --domain-chars 50000 --bleu-prompts 4 --classify-examples 400 --classify-steps 20 \
  --output-dir "${TMPDIR:-/tmp}/pyengine-gpu-demo" 2>&1 | tail -30

for script in bench/bench_lstm.py bench/bench_cross_entropy.py bench/bench_clip.py \
              bench/bench_int8.py bench/bench_generate.py bench/bench_prune.py \
              bench/bench_distill.py; do
  echo "== $script"
  if $PY "$script" --help 2>/dev/null | grep -q -- "--device"; then
    timeout 300 $PY "$script" --device cuda $QUICK
  else
    timeout 300 $PY "$script" $QUICK
  fi
done
