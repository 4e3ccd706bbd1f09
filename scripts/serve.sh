#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and starts the action server with the emotion model on port 5055.
# The model is EMOTION_MODEL (default iic/emotion2vec_plus_large, downloaded on first start).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m rasa_sdk --actions actions --port "${PORT:-5055}" "$@"
