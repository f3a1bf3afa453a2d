#!/usr/bin/env bash
# One prepared pass over every GPU path, for a machine with an NVIDIA GPU (about 8 minutes on one
# H200 with 16 cores, the build included). Usage:
#     bash bench/gpu_session.sh [OUT_DIR] [--quick]
# Writes under OUT_DIR (default: $OUT, else ./gpu-session): env.txt (machine, versions, the
# build's link facts), build.log, tests.txt (every CUDA test file in its own process, so a crash
# fails that file and not the run), checks.txt (drop-in, autocast training, demo), bench.txt
# (every family's CUDA benchmark) with results/*.json, profile.txt (GPU busy vs host time of an
# LSTM step), and summary.txt (printed last). Record the numbers in bench/RESULTS.md with the
# machine, torch and triton versions from env.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY=${PYTHON:-python3}
OUT_DIR=${1:-${OUT:-gpu-session}}
QUICK=${2:-}
mkdir -p "$OUT_DIR/results"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
started=$SECONDS

# ---- 1. the machine, and what the build links ------------------------------------------------
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
  ${CXX:-c++} --version | head -1
  echo "libstdc++.so for the linker: $(${CXX:-c++} -print-file-name=libstdc++.so)"
  echo "LDFLAGS=${LDFLAGS:-} CXXFLAGS=${CXXFLAGS:-}"
  $PY -c "import sysconfig as s; print('LDSHARED', s.get_config_var('LDSHARED')); print('LDFLAGS', s.get_config_var('LDFLAGS'))"
  nproc; lscpu | grep -E "Model name|Flags" | cut -c1-200
} > "$OUT_DIR/env.txt" 2>&1
note "machine: $(sed -n 2p "$OUT_DIR/env.txt")"

# ---- 2. build with every core -------------------------------------------------------------
t0=$SECONDS
MAX_JOBS=$(nproc) $PY -m pip install -v --no-build-isolation --no-deps -e . > "$OUT_DIR/build.log" 2>&1
build_rc=$?
{
  echo "== NEEDED"; readelf -d pyengine/_C*.so | grep NEEDED
  echo "== std::locale defined in _C (must be 0): $(nm --defined-only pyengine/_C*.so | grep -c _ZNSt6locale)"
  echo "== link line"; grep -E " -shared " "$OUT_DIR/build.log" | tail -1 | tr ' ' '\n' | grep -E "^-l|^-L|static|Bstatic|\.a$"
} >> "$OUT_DIR/env.txt" 2>&1
note "build: rc=$build_rc in $((SECONDS - t0)) s"
[ $build_rc -eq 0 ] || { tail -40 "$OUT_DIR/build.log"; exit 1; }
$PY -c "import pyengine; print(pyengine.backends.cpu)" >> "$OUT_DIR/env.txt" 2>&1

# ---- 3. the tests on CUDA tensors, one process per file --------------------------------------
: > "$OUT_DIR/tests.txt"
for f in tests/test_native_errors.py tests/test_build.py tests/ops/test_*.py \
         tests/test_nn_lstm.py tests/test_nn_loss.py tests/test_nn_distill.py tests/test_patch.py \
         tests/test_quantize.py tests/test_generate.py tests/serve/test_batching.py; do
  [ -e "$f" ] || continue
  [ "$f" = tests/ops/test_triton_compile.py ] && continue  # the real compiler runs here anyway
  out=$(timeout 600 $PY -m pytest -q -x -p no:cacheprovider "$f" 2>&1)
  rc=$?
  echo "== $f rc=$rc" >> "$OUT_DIR/tests.txt"
  echo "$out" | tail -25 >> "$OUT_DIR/tests.txt"
  note "tests $f: rc=$rc $(echo "$out" | tail -1)"
done

# ---- 4. drop-in checks, bf16/fp16 autocast training, the demo ---------------------------------
timeout 600 $PY - > "$OUT_DIR/checks.txt" 2>&1 <<'PYEOF'
import time
import torch, pyengine
from pyengine.data import ByteTokenizer, LanguageModelDataset, default_corpus
from pyengine.models import LSTMLanguageModel
from pyengine.train import Trainer

torch.manual_seed(0)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
for rec, kw in [(rec, kw) for rec in ("step", "persistent") for kw in
                [dict(), dict(num_layers=2, bidirectional=True), dict(proj_size=8, num_layers=2),
                 dict(num_layers=2, batch_first=True)]]:
    ref = torch.nn.LSTM(32, 300, **kw).cuda()  # 300 units: 19 persistent programs a row block
    ours = pyengine.nn.LSTM(32, 300, **kw).cuda()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(20, 70, 32, device="cuda", requires_grad=True)  # 70 rows: two row blocks
    with pyengine.backends.cuda.flags(lstm_recurrence=rec):
        a = ours(x)[0]
        ga = torch.autograd.grad(a.sum(), [x, *ours.parameters()])
    b = ref(x)[0]
    gb = torch.autograd.grad(b.sum(), [x, *ref.parameters()])
    rel = max([((a - b).norm() / b.norm()).item()] +
              [((p - q).norm() / q.norm()).item() for p, q in zip(ga, gb)])
    print(f"nn.LSTM cuda ({rec}) vs cuDNN (TF32 off)", kw, f"worst relative error {rel:.2e}")

lm = pyengine.LSTMLanguageModel(256, 64, 128, 2).eval()
for act in ("dynamic", "none"):
    q = pyengine.quantize(lm, act=act, inplace=False)
    tokens = torch.randint(0, 256, (4, 33))
    with torch.no_grad():
        cpu = q(tokens)[0]
        gpu = q.cuda()(tokens.cuda())[0].cpu()
    print("int8 LM cuda vs cpu", act, f"max abs diff {(gpu - cpu).abs().max().item():.2e}")

data = LanguageModelDataset.from_text(default_corpus(200_000), ByteTokenizer(), 16, 64)
for precision in ("fp32", "bf16", "fp16"):
    torch.manual_seed(0)
    t = Trainer(LSTMLanguageModel(256, 128, 256, 2), device="cuda", precision=precision,
                loggers=[], progress=False, log_grad_norms=False, log_every=1000, max_steps=60)
    start = time.perf_counter()
    t.fit(data)
    torch.cuda.synchronize()
    batches = list(data.batches())[:4]
    torch.cuda.set_sync_debug_mode("warn")
    for b in batches:
        t.train_step(b, stateful=True)
    torch.cuda.set_sync_debug_mode(0)
    print(f"Trainer cuda {precision}: 60 steps in {time.perf_counter() - start:.1f} s, "
          f"eval loss {t.evaluate(data)['loss']:.3f}")
PYEOF
note "checks: rc=$? $(grep -c . "$OUT_DIR/checks.txt") lines"
timeout 600 $PY -m pyengine demo --device cuda --steps 100 --domain-steps 20 \
  --domain-chars 50000 --bleu-prompts 4 --classify-examples 400 --classify-steps 20 \
  --output-dir "$OUT_DIR/demo" >> "$OUT_DIR/checks.txt" 2>&1
note "demo on cuda: rc=$? $(grep -i "speed\|faster\|x the" "$OUT_DIR/checks.txt" | tail -1)"

# ---- 5. GPU busy time against host time of one LSTM training step ----------------------------
timeout 300 $PY - > "$OUT_DIR/profile.txt" 2>&1 <<'PYEOF'
import time
import torch, pyengine
from torch.profiler import ProfilerActivity, profile
for name, cls, rec in (("ours step", pyengine.nn.LSTM, "step"),
                       ("ours persistent", pyengine.nn.LSTM, "persistent"),
                       ("cuDNN", torch.nn.LSTM, "step")):
    pyengine.backends.cuda.lstm_recurrence = rec
    torch.manual_seed(0)
    m = cls(256, 512, 2).cuda()
    x = torch.randn(64, 32, 256, device="cuda", requires_grad=True)
    for _ in range(3):
        m(x)[0].sum().backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(5):
            m(x)[0].sum().backward()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / 5
    busy = sum(e.device_time_total for e in prof.key_averages()
               if e.device_time_total and e.device_type == torch.autograd.DeviceType.CUDA) / 5
    launches = sum(e.count for e in prof.key_averages() if "LaunchKernel" in e.key) / 5
    print(f"{name}: wall {wall * 1e3:.2f} ms/step, GPU busy {busy / 1e3:.2f} ms/step, "
          f"{launches:.0f} launches/step")
PYEOF
note "profile: $(tr '\n' ';' < "$OUT_DIR/profile.txt")"

# ---- 6. every family's CUDA benchmark ----------------------------------------------------------
: > "$OUT_DIR/bench.txt"
for family in lstm cross_entropy distill clip int8 int8_lstm generate prune train; do
  script=bench/bench_$family.py
  [ -e "$script" ] || continue
  echo "== $script" >> "$OUT_DIR/bench.txt"
  timeout 420 $PY "$script" --device cuda --no-write --json "$OUT_DIR/results/$family.json" \
    $QUICK >> "$OUT_DIR/bench.txt" 2>&1
  note "bench $family: rc=$?"
done

note "done in $((SECONDS - started)) s"
cat "$SUMMARY"
