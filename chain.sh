#!/usr/bin/env bash
# Three training sessions in a row (doc/CHAINING.md); the chain stops at the first session that fails.
set -euo pipefail
cd "$(dirname "$0")"
python train.py --config chain0.json
python train.py --config chain1.json
python train.py --config chain2.json
