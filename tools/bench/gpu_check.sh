#!/usr/bin/env bash
# The GPU checks behind docs/benchmarks.md "On an H100": run from the repository root on a machine with a GPU.
#
#   tools/bench/gpu_check.sh OUT [SECTION ...]     (default sections: env paths fastdemo variants profile)
#
#   env       the GPU, driver and package versions
#   paths     tools/bench/cuda_paths.py: fp32 / bf16 / fp16 / channels_last steps of SD 1.5's UNet, the kl-f8 VAE
#             and ViT-B/32, with MFU and the attention kernels SDPA picks
#   profile   the SD 1.5 UNet's bf16 step (plain and channels_last) under the profiler: its top GPU kernels
#   compile   the same with torch.compile (UNet and VAE in channels_last, CLIP plain); compiling takes minutes
#   fastdemo  python -m trainer.demo --fast --device cuda: the three stages through Hydra and Lightning on the GPU
#   variants  on the fast demo's shards and exports, short Hydra runs of the paths the demo does not take:
#             16-mixed for all three stages, channels_last, task.compile, and the FSDP strategy on one GPU
#   fsdp      the three stages under FSDP on one GPU (after fastdemo)
#   demo      the full demo on the GPU (DEMO_ARGS, e.g. "--ldm-steps 6600", are passed on)
#
# Each section's full log is WORK/<section>.log (WORK: /tmp/latentloom-gpu-check by default); OUT/gpu_check.log
# gathers their ends (the last 300 lines of a section that failed). A section that fails does not stop the others.
# The last lines printed are a summary: one line per section and per variant, with its exit status.
set -u
out=${1:?usage: tools/bench/gpu_check.sh OUT [env|paths|profile|compile|fastdemo|variants|fsdp|demo ...]}
shift
sections=${*:-env paths fastdemo variants profile}
py=${PYTHON:-python3}
work=${WORK:-/tmp/latentloom-gpu-check}
mkdir -p "$out" "$work"
summary=()

section() {  # section NAME TIMEOUT_S COMMAND...: run with a time limit, log it, remember the exit status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$work/$name.log" 2>&1
    local status=$?
    local keep=120
    [ "$status" -ne 0 ] && keep=300
    { echo "=== $name (exit $status): $*"; tail -n "$keep" "$work/$name.log"; } | tee -a "$out/gpu_check.log"
    summary+=("$name: exit $status in $((SECONDS - start)) s")
}

last_metrics() {  # the run's last logged train/loss and val/loss, and its last step
    "$py" - "$1" <<'EOF'
import csv, pathlib, sys
rows = [r for f in pathlib.Path(sys.argv[1]).rglob("metrics.csv") for r in csv.DictReader(open(f))]
def last(key):
    values = [r[key] for r in rows if r.get(key)]
    return values[-1] if values else "-"
print(f"step {last('step')}, train/loss {last('train/loss')}, val/loss {last('val/loss')}")
EOF
}

variant() {  # variant NAME EXPERIMENT OVERRIDES...: a short Hydra run on the fast demo's data and exports
    local name=$1 experiment=$2
    shift 2
    local fast=$work/fast
    section "variant-$name" 300 "$py" -m trainer.train "experiment=$experiment" "hydra.run.dir=$work/$name" \
        data.prepare=null "data.train.urls=$fast/shards/train.manifest.json" \
        "data.val.urls=$fast/shards/val.manifest.json" logger=csv trainer.accelerator=gpu trainer.max_steps=60 \
        trainer.val_check_interval=60 trainer.check_val_every_n_epoch=null trainer.limit_val_batches=2 \
        callbacks.checkpoint.every_n_train_steps=60 data.num_workers=4 "$@"
    summary[-1]+=", $(last_metrics "$work/$name")"
}

for s in $sections; do
    case $s in
    env)
        section env 60 bash -c "nvidia-smi; $py -c 'import torch, pytorch_lightning as pl, open_clip, webdataset;
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), pl.__version__, open_clip.__version__)'"
        ;;
    paths)
        section paths 400 "$py" tools/bench/cuda_paths.py --modes fp32 bf16 fp16 bf16+cl
        ;;
    profile)
        section profile 300 "$py" tools/bench/cuda_paths.py --models unet --modes bf16 bf16+cl --iters 3 --profile
        ;;
    compile)
        section compile-conv 300 "$py" tools/bench/cuda_paths.py --models unet vae --modes bf16+cl bf16+cl+compile
        section compile-clip 150 "$py" tools/bench/cuda_paths.py --models clip --modes bf16 bf16+compile
        ;;
    fastdemo)
        section fastdemo 400 "$py" -m trainer.demo --fast --device cuda --out "$work/fast"
        ;;
    variants | fsdp)
        clip=$work/fast/clip/export/clip
        vae=$work/fast/autoencoder/export/autoencoder.safetensors
        ldm=("task.text_encoder.source=$clip" "task.autoencoder.checkpoint=$vae")
        if [ "$s" = fsdp ]; then
            variant ldm-fsdp shapes_ldm "${ldm[@]}" trainer=fsdp trainer.devices=1
            variant clip-fsdp shapes_clip trainer=fsdp trainer.devices=1
            variant vae-fsdp shapes_autoencoder trainer=fsdp trainer.devices=1
            continue
        fi
        variant clip-fp16 shapes_clip trainer.precision=16-mixed
        variant clip-compile shapes_clip trainer.precision=bf16-mixed task.compile=true
        variant vae-fp16-cl shapes_autoencoder trainer.precision=16-mixed task.channels_last=true
        variant vae-compile shapes_autoencoder trainer.precision=bf16-mixed task.channels_last=true task.compile=true
        variant ldm-fp16-cl shapes_ldm "${ldm[@]}" trainer.precision=16-mixed task.channels_last=true
        variant ldm-compile shapes_ldm "${ldm[@]}" trainer.precision=bf16-mixed task.compile=true
        variant ldm-fsdp shapes_ldm "${ldm[@]}" trainer=fsdp trainer.devices=1
        ;;
    demo)
        section demo 590 "$py" -m trainer.demo --device cuda --out "$work/demo" ${DEMO_ARGS:-}
        ;;
    *)
        echo "unknown section $s" >&2
        ;;
    esac
done
{ echo; echo "=== summary"; printf '%s\n' "${summary[@]}"; } | tee -a "$out/gpu_check.log"
