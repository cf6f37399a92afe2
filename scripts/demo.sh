#!/usr/bin/env bash
# The whole release loop on the embedded tiny model, offline, with real Axolotl training:
# 1.0.0 (initial) -> 1.1.0 (continued LoRA + replay) -> 1.1.1 (patch) -> 2.0.0 (merge and
# retrain) -> roll back to 1.1.0 -> 1.2.0 (built on 1.1.0) -> the gateway serves 1.1.0 as champion
# and 1.2.0 as challenger on 10% of a few hundred users, captures every answer, ab compare reads
# them. Every release prints its pass rate per domain before and after, and its answer to one
# fixed question. Usage: scripts/demo.sh [DIR] (DEMO_REQUESTS: how many users, default 300)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cl="${CL_RELEASE:-$here/.venv/bin/cl-release}"
dir="${1:-$here/demo-repo}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled AXOLOTL_DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
# A ~1 M-parameter model trains fastest on one CPU thread (two threads are slower, much slower
# on a busy machine).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

step() { printf '\n\033[1;34m== %s\033[0m\n' "$*"; }
commit() { git -C "$dir" add -A && git -C "$dir" commit -q -m "$1"; }
start=$(date +%s)

if [ -e "$dir" ]; then
  step "removing the previous demo repository $dir"
  rm -rf "$dir"
fi
step "cl-release init --demo $dir"
"$cl" init "$dir" --demo

step "1.0.0: initial LoRA on the Q1 domain data (exposure limits)"
"$cl" -C "$dir" plan minor | sed -n '1,7p'
"$cl" -C "$dir" release minor --notes "Initial release: exposure limits (IDLH)"

step "1.1.0: new Q2 data (storage temperatures), continued LoRA from 1.0.0 with replay"
cp "$dir/datasets/incoming/q2-storage.jsonl" "$dir/datasets/domain/"
commit "Add Q2 storage data"
"$cl" -C "$dir" release minor --notes "Q2: storage temperatures"

step "1.1.1: safety patch from corrections"
cp "$dir/datasets/incoming/corrections-001.jsonl" "$dir/datasets/corrections/"
commit "Add corrections"
"$cl" -C "$dir" release patch --notes "Fix IDLH answers for chlorine, phosgene, arsine"

step "2.0.0: merge 1.1.1 into the base and retrain on the complete data"
"$cl" -C "$dir" release major --notes "Yearly merge and retrain"

step "roll back to 1.1.0 and build 1.2.0 on it (new Q3 data: protective equipment)"
"$cl" -C "$dir" rollback 1.1.0
cp "$dir/datasets/incoming/q3-protection.jsonl" "$dir/datasets/domain/"
commit "Add Q3 protection data"
"$cl" -C "$dir" release minor --notes "Q3: protective equipment"

step "merged weights of 1.2.0, and what a push would upload"
"$cl" -C "$dir" merge 1.2.0
"$cl" -C "$dir" push 1.2.0 --merged --dry-run

step "lineage and report"
"$cl" -C "$dir" list
"$cl" -C "$dir" verify
"$cl" -C "$dir" report
git -C "$dir" tag

step "the gateway: 1.1.0 champion, 1.2.0 challenger on 10% of users, every answer captured"
"$cl" -C "$dir" ab champion 1.1.0 --reason "demo: the version before 1.2.0"
"$cl" -C "$dir" ab start 1.2.0 --traffic 0.1
# The tiny model on a few shared cores is fastest on one torch thread (see README, serve.torch_threads).
printf 'serve:\n  torch_threads: 1\n' >> "$dir/cl-release.yaml"
commit "Serve the tiny model on one torch thread"
py="${DEMO_PYTHON:-$(dirname "$cl")/python}"
CL_RELEASE_TOKEN="$("$py" -c 'import secrets; print(secrets.token_hex(16))')"
export CL_RELEASE_TOKEN
gwlog="$dir/outputs/gateway.log"
"$cl" -C "$dir" serve --port 0 --backend local 2> "$gwlog" &
gw=$!
stop_gateway() { kill "$gw" 2>/dev/null && wait "$gw" 2>/dev/null || true; }
trap stop_gateway EXIT
url="" ready=""
for _ in $(seq 600); do  # the model loads before the server listens
  url="$(grep -o 'http://[0-9.]*:[0-9]*' "$gwlog" | head -1 || true)"
  if [ -n "$url" ] && "$py" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/health", timeout=2)' \
    "$url" 2> /dev/null; then ready=1; break; fi
  kill -0 "$gw" 2>/dev/null || { cat "$gwlog"; echo "the gateway did not start" >&2; exit 1; }
  sleep 0.2
done
[ -n "$ready" ] || { cat "$gwlog"; echo "the gateway did not answer /health in 2 minutes" >&2; exit 1; }
echo "gateway on $url"
"$py" "$here/scripts/demo_traffic.py" --url "$url" --requests "${DEMO_REQUESTS:-300}"
"$cl" -C "$dir" ab compare
stop_gateway
trap - EXIT
echo "demo finished in $(( $(date +%s) - start ))s; report: $dir/outputs/reports/index.html"
