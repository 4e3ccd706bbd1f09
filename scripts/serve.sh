#!/usr/bin/env bash
# Sets up .venv once (scripts/setup.sh) and starts the action server with the emotion model
# on port 5055 (PORT), listening on HOST (default 0.0.0.0, every interface, as rasa-sdk does;
# HOST=127.0.0.1 keeps it on this machine). The model is EMOTION_MODEL (default
# iic/emotion2vec_plus_large, downloaded on first start). Later starts touch no network.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export SANIC_HOST=${HOST:-0.0.0.0}
exec .venv/bin/python -m rasa_sdk --actions actions --port "${PORT:-5055}" "$@"
