#!/usr/bin/env bash
# The one GPU check: everything tinv measures on a lent H100/H200, in one call of at most 8 minutes.
#
#   bash bench/gpu-check.sh OUT            # on the GPU machine (SD 1.5 architecture, random weights, 512 px, bf16)
#   bash bench/gpu-check.sh OUT --cpu      # the same steps on CPU with the tiny model: proves the script here
#
# Steps, each under its own time limit so that one slow step cannot eat the others' time:
#   1. environment      GPU, driver, torch/diffusers versions                      -> OUT/env.json
#   2. smoke train      `tinv train` on builtin:sd15-random at 512 px in bf16       -> OUT/smoke.jsonl, OUT/smoke-run/
#   3. training bench   bench/train.py --recipe both (tinv vs the naive recipe)     -> OUT/train.jsonl
#   4. generation bench bench/generate.py --grid (tinv vs plain diffusers)          -> OUT/generate.jsonl
#   5. SDXL train bench bench/train.py --model sdxl (builtin:sdxl-random, 1024 px, both encoders;
#                       tinv vs diffusers' textual_inversion_sdxl.py recipe; MFU)  -> OUT/train-sdxl.jsonl
# The step limits add up to 8 minutes (480 s) on the GPU.
# and a table of the headline figures, printed last. Everything is also in OUT/gpu-check.log.
#
# The GPU machine has PyTorch but not diffusers, pydantic or cel-python, and reaches no registry:
# `bash bench/gpu-wheels.sh` (run here first) puts their wheels and tinv's own into .whl/, and the
# device call carries that folder: run(command="bash bench/gpu-check.sh $OUT", carry=[".whl"]).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${1:?usage: bench/gpu-check.sh OUT [--cpu]}
MODE=gpu
[ "${2:-}" = "--cpu" ] && MODE=cpu
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu-check.log"
rm -f "$OUT"/*.jsonl "$OUT"/env.json
: >"$LOG"
export PYTHONUNBUFFERED=1

say() { echo "gpu-check: $*" | tee -a "$LOG"; }

# Python: the project's venv where there is one (here), else the machine's python3 with carried wheels.
if [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
  if compgen -G ".whl/*.whl" >/dev/null; then
    say "installing carried wheels into /tmp/tinv-site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tinv-site .whl/*.whl >>"$LOG" 2>&1 \
      || { say "wheel install failed (see $LOG)"; exit 1; }
    export PYTHONPATH=/tmp/tinv-site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi

if [ "$MODE" = gpu ]; then
  DEVICE=cuda MODEL=sd15 SOURCE=builtin:sd15-random RES=512 PREC=bf16 BATCH=8 STEPS=30
  LIMIT_SMOKE=90 LIMIT_TRAIN=110 LIMIT_GEN=120 LIMIT_XL=100
  TRAIN_ARGS=(--batch 8 --accum 4)
  GEN_ARGS=(--grid)
  XL_MODEL=sdxl XL_ARGS=(--batch 4 --accum 1 --steps 8)
else
  DEVICE=cpu MODEL=tiny SOURCE=builtin:tiny RES=64 PREC=no BATCH=2 STEPS=6
  LIMIT_SMOKE=180 LIMIT_TRAIN=240 LIMIT_GEN=240 LIMIT_XL=240
  TRAIN_ARGS=(--steps 5 --threads 1)
  GEN_ARGS=(--batch-sizes 1,4 --images 4 --compile off --threads 1 --grid)
  XL_MODEL=tiny-xl XL_ARGS=(--steps 5 --threads 1)
fi

# Run one step under a time limit; its stdout's JSON lines go to OUT/<name>.jsonl, the rest to the log.
step() {
  local name=$1 limit=$2
  shift 2
  say "step $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$OUT/$name.out" 2>>"$LOG"
  local rc=$?
  grep -E '^\{' "$OUT/$name.out" >"$OUT/$name.jsonl" || true
  grep -vE '^\{' "$OUT/$name.out" >>"$LOG" || true
  rm -f "$OUT/$name.out"
  say "step $name: exit $rc after $((SECONDS - start))s, $(wc -l <"$OUT/$name.jsonl") result lines"
  echo "{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - start))}" >>"$OUT/steps.jsonl"
}

: >"$OUT/steps.jsonl"
step env 60 "$PY" - "$DEVICE" <<'EOF'
import json, platform, sys
import torch, diffusers, transformers
dev = sys.argv[1]
info = {"name": "environment", "python": platform.python_version(), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "device": dev}
if dev == "cuda":
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1), sm=f"{props.major}.{props.minor}",
                multiprocessors=props.multi_processor_count, bf16=torch.cuda.is_bf16_supported())
print(json.dumps(info))
EOF
mv "$OUT/env.jsonl" "$OUT/env.json"

# 2. Smoke train: the real `tinv train` front door on SD 1.5's architecture, then its progress.json.
cat >"$OUT/smoke-job.yaml" <<EOF
apiVersion: tinv.io/v1alpha1
kind: TextualInversionJob
metadata:
  name: gpu-smoke
spec:
  model:
    source: $SOURCE
  concepts:
    - token: det-logo
      property: object
      initializer: brain logo, sharp lines, connected circles
      images: $(pwd)/examples/images/det-logo
  training:
    steps: $STEPS
    batchSize: $BATCH
    gradientAccumulation: 1
    resolution: $RES
    mixedPrecision: "$PREC"
    checkpointEvery: $STEPS
    logEvery: 5
  storage:
    uri: file://$OUT/smoke-run
EOF
step smoke-train "$LIMIT_SMOKE" "$PY" -m tinv.trainer train "$OUT/smoke-job.yaml" --device "$DEVICE" --fresh
"$PY" - "$OUT" "$DEVICE" "$RES" "$BATCH" >>"$OUT/smoke.jsonl" 2>>"$LOG" <<'EOF'
import glob, json, math, sys
out, device, res, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
paths = glob.glob(f"{out}/smoke-run/**/progress.json", recursive=True)
if not paths:
    print(json.dumps({"name": "smoke_train", "ok": False, "why": "no progress.json written"}))
    sys.exit(0)
p = json.load(open(paths[0]))
loss = p.get("loss")
ok = p.get("state") == "succeeded" and p.get("step") == p.get("total_steps") and p.get("latest_checkpoint")
print(json.dumps({"name": "smoke_train", "ok": bool(ok and loss is not None and math.isfinite(loss)), "device": device,
                  "resolution": res, "batch": batch, "progress": p}))
if p.get("samples_per_second"):
    print(json.dumps({"name": "smoke_train_samples_per_second", "value": p["samples_per_second"], "unit": "samples/s",
                      "config": {"resolution": res, "batch": batch, "device": device, "front_door": "tinv train"}}))
EOF

# 3 and 4. The benchmarks, side by side with their baselines in the same run.
step train "$LIMIT_TRAIN" "$PY" bench/train.py --device "$DEVICE" --model "$MODEL" --recipe both "${TRAIN_ARGS[@]}"
step generate "$LIMIT_GEN" "$PY" bench/generate.py --device "$DEVICE" --model "$MODEL" "${GEN_ARGS[@]}"
# 5. SDXL (issue 16): its architecture at 1024 px on the GPU (builtin:tiny-xl at 64 px with --cpu).
step train-sdxl "$LIMIT_XL" "$PY" bench/train.py --device "$DEVICE" --model "$XL_MODEL" --recipe both "${XL_ARGS[@]}"

# The headline figures, last (the device tool returns the end of the output).
"$PY" - "$OUT" <<'EOF' | tee -a "$LOG"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def rows(name):
    p = out / f"{name}.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []
print("gpu-check summary (" + str(out) + ")")
for r in rows("steps"):
    print(f"  step {r['step']:<12} exit {r['exit']:>3}  {r['seconds']:>4}s")
for kind in ("smoke", "train", "generate", "train-sdxl"):
    for r in rows(kind):
        if "value" in r:
            c = r.get("config", {})
            tag = " ".join(f"{k}={c[k]}" for k in ("recipe", "impl", "batch", "batch_size", "compile") if k in c)
            print(f"  {kind:<9} {r['name']:<34} {r['value']:>10.3f} {r.get('unit', ''):<10} {tag}")
        elif r.get("name") == "smoke_train":
            print(f"  smoke     ok={r['ok']} step={r.get('progress', {}).get('step')} loss={r.get('progress', {}).get('loss')}")
EOF
failed=$(grep -c '"exit": [^0]' "$OUT/steps.jsonl" || true)
[ "$failed" = 0 ] && say "all steps passed" || say "$failed step(s) failed or ran out of time"
exit $(( failed > 0 ))
