#!/usr/bin/env bash
# Three training sessions in a row (doc/CHAINING.md); the chain stops at the first session that fails.
# Run it again after a crash or Ctrl-C: finished sessions are skipped, the interrupted one continues
# exactly where its last save left it (--resume_run auto), and the rest follow.
set -euo pipefail
cd "$(dirname "$0")"
python train.py --config chain0.json --resume_run auto
python train.py --config chain1.json --resume_run auto
python train.py --config chain2.json --resume_run auto
