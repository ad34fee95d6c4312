"""Where the repository's shipped files live (no imports: train/config.py reads it before jax is imported)."""

import os

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS_DIR = os.path.join(REPO_DIR, "configs", "models")  # model presets: configs/models/<name>.yaml
