"""Where the files the project ships live."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER_DIR = ASSETS / "tokenizer"
DEMO_MODEL_DIR = ASSETS / "demo-model"
DEMO_LORAS_DIR = ASSETS / "loras"
