#!/usr/bin/env bash
# Regenerate tests/fixtures/rmu_golden/: the published RMU reference run as it ran, under the
# transformers it pins, on a tiny float32 Mistral (see scripts/rmu_reference_golden.py).
#
#   bash scripts/rmu_reference_golden.sh [REFERENCE_GIT_DIR] [VENV]
#
# REFERENCE_GIT_DIR: a git directory holding commit bc5e1ba of centerforaisafety/wmdp (a clone of
#   https://github.com/centerforaisafety/wmdp, or of a fork that contains the commit; the golden
#   file in the repository was made from the fork manwaner333/wmdp_qing, whose history holds
#   bc5e1ba unchanged). Default: the snapshot at /work/.mirror/manwaner333+wmdp_qing/repo.
# VENV: where the separate environment goes (default /tmp/ref-venv): Python 3.11,
#   transformers==4.38.2 (the reference's requirements.txt), torch 2.13.0 (the CPU wheel this
#   project installs, not the reference's torch 2.1.2, whose Linux wheel on PyPI brings
#   gigabytes of CUDA libraries: both sides of the test then run the same torch, so the
#   attention kernels are the same and only transformers differs), sentencepiece (its slow
#   tokenizer).
set -euo pipefail
cd "$(dirname "$0")/.."
REF_GIT=${1:-/work/.mirror/manwaner333+wmdp_qing/repo}
VENV=${2:-/tmp/ref-venv}
COMMIT=bc5e1ba
OUT=tests/fixtures/rmu_golden
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q torch==2.13.0 transformers==4.38.2 sentencepiece protobuf 'numpy<2.3'

# The reference's files, exactly as committed at $COMMIT:
mkdir -p "$WORK/reference/rmu"
for f in rmu/__init__.py rmu/unlearn.py rmu/utils.py; do
  git --git-dir="$REF_GIT" show "$COMMIT:$f" > "$WORK/reference/$f"
done
FULL=$(git --git-dir="$REF_GIT" rev-parse "$COMMIT^{commit}")

"$VENV/bin/python" scripts/rmu_reference_golden.py --reference "$WORK/reference" \
  --tokenizer tests/fixtures/tokenizers/mistral-7b-v0.1 --out "$OUT" --work "$WORK/run"

VERSIONS=$("$VENV/bin/python" -c 'import torch, transformers, tokenizers, sentencepiece, sys
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers "
      f"{transformers.__version__}, tokenizers {tokenizers.__version__}, sentencepiece "
      f"{sentencepiece.__version__}")')
cat > "$OUT/PROVENANCE.md" <<EOF
# Provenance of the RMU golden file

- Reference code: centerforaisafety/wmdp at commit $FULL, files rmu/__init__.py, rmu/unlearn.py,
  rmu/utils.py, taken by \`git --git-dir=REPO show $COMMIT:rmu/<file>\` (REPO: a clone holding
  the commit; this one was made from a snapshot of the fork manwaner333/wmdp_qing, whose history
  holds $COMMIT unchanged) and imported unmodified.
- Environment: $VERSIONS (CPU, one thread). The reference pins transformers 4.38.2 and torch
  2.1.2; the torch the project installs (2.13.0, CPU) ran it instead: the same torch as the wmdp
  side of the test, so only transformers differs.
- Command: \`bash scripts/rmu_reference_golden.sh\` (driver: scripts/rmu_reference_golden.py,
  whose docstring lists the one I/O patch, float32 on the CPU instead of load_model's float16 and
  device_map="auto", and what is only recorded).
- Files: golden.json (per-step forget and retain MSE as run_rmu computed them, hyperparameters,
  hashes of the initial weights, versions); golden.safetensors (the input_ids of all 40 batches,
  step 0's forget activations after block 2 with its attention mask, the two trained tensors
  after 20 steps); control_vectors.safetensors (run_rmu's two torch.rand(1, 1, 32) draws, the one
  input the wmdp run is given); config.json (the tiny model); tokenizer_config.json (the
  fixture's, less "add_prefix_space": null: see the driver); data/ (the four corpora).
EOF
echo "wrote $OUT"
