#!/usr/bin/env bash
# The GPU check (issue 14): the real CLI under torchrun on one GPU, then the customization
# benchmark and a faiss-gpu index build; everything measured goes to OUT/gpu_check.{json,md}.
#
#   bash benchmarks/gpu_check.sh OUT             # one GPU: NCCL, ViT-B-32 (random weights), bf16
#   bash benchmarks/gpu_check.sh OUT --cpu       # the same commands on CPU (gloo), tiny sizes
#
# Steps: a small mini world (react-vl world); a NCCL/gloo probe under torchrun (the
# cpu:gloo,cuda:nccl group react_vl.distributed starts, which one process alone does not start:
# a CUDA and a CPU all_reduce, all_gather_object, barrier); `react-vl embed` of PAIRS pairs and
# `react-vl customize` (gated-image, STEPS steps) under torchrun --nproc-per-node 1;
# benchmarks/bench_customize.py (full, locked-text, gated-image, cached caption embeddings, grad
# checkpointing, the batch-first layout); `pip install faiss-gpu` and, when it installs (or on
# CPU with faiss-cpu), an IVF index over the embedded images built and searched. A failed step
# is recorded with its exit code and the next one still runs. Sizes: env PAIRS, STEPS, BATCH,
# MODEL, BENCH_BATCH, BENCH_STEPS, LOADERS; COMPILE=1 adds the torch.compile rows.
set -uo pipefail

OUT=${1:?usage: gpu_check.sh OUT_DIR [--cpu]}
DEVICE=${DEVICE:-cuda}
if [[ "${2:-}" == "--cpu" ]]; then DEVICE=cpu; fi
if [[ $DEVICE == cpu ]]; then  # tiny: proves the commands end to end on a laptop-sized CPU
    : "${PAIRS:=256}" "${STEPS:=5}" "${BATCH:=32}" "${MODEL:=mini-vit}" "${BENCH_BATCH:=32}" "${BENCH_STEPS:=2}" "${LOADERS:=2}"
else
    : "${PAIRS:=2048}" "${STEPS:=50}" "${BATCH:=128}" "${MODEL:=ViT-B-32}" "${BENCH_BATCH:=256}" "${BENCH_STEPS:=10}" "${LOADERS:=8}"
fi
HERE=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$HERE/../src${PYTHONPATH:+:$PYTHONPATH}"  # a checkout that is not pip-installed runs too
WORK=$(mktemp -d)
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
STAGES="$WORK/stages.tsv"
: >"$LOG"
: >"$STAGES"
export PYTHONUNBUFFERED=1

free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

stage() {  # stage NAME COMMAND...: run it, log its output, record its exit code and seconds
    local name=$1 start rc
    shift
    echo "=== $name: $*" | tee -a "$LOG"
    start=$(date +%s%N)
    "$@" 2>&1 | tail -n 40 >>"$LOG"
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((($(date +%s%N) - start) / 1000000))" | tee -a "$STAGES"
}

torchrun_1() { python -m torch.distributed.run --nproc-per-node 1 --master-port "$(free_port)" "$@"; }

cat >"$WORK/probe.py" <<'EOF'
import json, sys, torch, torch.distributed as dist
from react_vl.distributed import BACKENDS, init_distributed
env = init_distributed(sys.argv[1])
dist.init_process_group(BACKENDS[env.device.type])  # one process: init_distributed starts no group
on_device = torch.ones(4, device=env.device); dist.all_reduce(on_device)
on_cpu = torch.tensor([3]); dist.all_reduce(on_cpu, op=dist.ReduceOp.MIN)
gathered = [None]; dist.all_gather_object(gathered, {"rank": dist.get_rank()})
dist.barrier(device_ids=[env.device.index]) if env.device.type == "cuda" else dist.barrier()
print(json.dumps({"backend": str(dist.get_backend()), "device": str(env.device), "gathered": gathered,
                  "device_sum": on_device.sum().item(), "cpu_min": int(on_cpu)}))
dist.destroy_process_group()
EOF

cat >"$WORK/faiss_gpu.py" <<'EOF'
import json, sys, time, numpy as np, faiss
from react_vl.kb import KnowledgeBase
vectors = np.ascontiguousarray(KnowledgeBase(sys.argv[1]).image_embeddings().astype(np.float32))
gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
index = faiss.index_factory(vectors.shape[1], f"IVF{max(1, len(vectors) // 64)},Flat", faiss.METRIC_INNER_PRODUCT)
if gpus:
    index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
start = time.perf_counter(); index.train(vectors); index.add(vectors); built = time.perf_counter() - start
start = time.perf_counter(); _, ids = index.search(vectors[:256], 10); searched = time.perf_counter() - start
print(json.dumps({"faiss": faiss.__version__, "gpus": gpus, "vectors": len(vectors), "build_s": built,
                  "search_256_s": searched, "self_hit_rate": float(np.mean(ids[:, 0] == np.arange(len(ids))))}))
EOF

echo "gpu_check on $DEVICE: model $MODEL, $PAIRS pairs, $STEPS steps at batch $BATCH; work folder $WORK" | tee -a "$LOG"
stage environment bash -c "nvidia-smi -L 2>&1 | head -2; python -c 'import torch, open_clip; print(torch.__version__, open_clip.__version__, torch.cuda.is_available())'"
stage world python -m react_vl.cli world --out "$WORK/world" --pretrain-size "$PAIRS" --kb-size "$PAIRS" --eval-size 16 --val-size 16 \
    --shard-size $((PAIRS / 8)) --workers "$LOADERS"
stage distributed_probe bash -c "python -m torch.distributed.run --nproc-per-node 1 --master-port $(free_port) $WORK/probe.py $DEVICE | tail -1 >$WORK/probe.json"
stage embed torchrun_1 -m react_vl.cli embed "$WORK/world/kb" --model "$MODEL" --out "$WORK/KB" --batch-size 256 \
    --workers "$LOADERS" --device "$DEVICE" --precision bf16
stage customize torchrun_1 -m react_vl.cli customize "$WORK/world/pretrain" --model "$MODEL" --out "$WORK/RUN" \
    --strategy gated-image --steps "$STEPS" --batch-size "$BATCH" --precision bf16 --workers "$LOADERS" \
    --device "$DEVICE" --log-every 10 --checkpoint-every "$STEPS"
stage bench_customize python "$HERE/bench_customize.py" --device "$DEVICE" --model "$MODEL" --batch "$BENCH_BATCH" \
    --steps "$BENCH_STEPS" --workers "$LOADERS" --json "$OUT/bench_customize.json" \
    --variants full,locked-text,gated-image,gated-image-cached,gated-image-ckpt,gated-image-batch-first ${COMPILE:+--compile}
if [[ $DEVICE == cuda ]]; then
    stage faiss_gpu_install bash -c "pip install -q faiss-gpu-cu12 || pip install -q faiss-gpu"
fi
stage faiss_index bash -c "python $WORK/faiss_gpu.py $WORK/KB | tail -1 >$WORK/faiss.json"

python - "$OUT" "$WORK" "$DEVICE" "$MODEL" <<'EOF'
import json, sys
from pathlib import Path
out, work, device, model = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
stages = [{"stage": name, "rc": int(rc), "seconds": int(ms) / 1000} for name, rc, ms in
          (line.split("\t") for line in (work / "stages.tsv").read_text().splitlines())]
embed, run = load(work / "KB" / "embed_summary.json") or {}, load(work / "RUN" / "summary.json") or {}
result = {"device": device, "model": model, "stages": stages, "distributed_probe": load(work / "probe.json"),
          "embed": {"count": embed.get("count"), "skipped": embed.get("skipped"), **embed.get("this_run", {})},
          "customize": {k: run.get(k) for k in ("steps", "time_s", "samples_per_s", "first_loss", "final_loss", "skipped")},
          "bench_customize": (load(out / "bench_customize.json") or {}).get("rows"), "faiss": load(work / "faiss.json")}
(out / "gpu_check.json").write_text(json.dumps(result, indent=1))
lines = [f"# gpu_check on {device} ({model})", "", "| stage | exit | seconds |", "|---|---|---|"]
lines += [f"| {s['stage']} | {s['rc']} | {s['seconds']:.1f} |" for s in stages]
if result["bench_customize"]:
    full = result["bench_customize"][0]
    lines += ["", "| variant | s/step | x full | peak MiB | x full |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['step_s']:.3f} | {r['step_s'] / full['step_s']:.2f} | {r['train_peak_mib']:.0f} | "
              f"{r['train_peak_mib'] / full['train_peak_mib']:.2f} |" for r in result["bench_customize"]]
lines += ["", "```", json.dumps({k: result[k] for k in ("distributed_probe", "embed", "customize", "faiss")}, indent=1), "```"]
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
rm -rf "$WORK"
