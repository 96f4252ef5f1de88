"""Every test runs offline: no hub access, no telemetry."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment above is set)

# The tiny models are far faster on one thread than on two contended ones (CI has 2 cores).
torch.set_num_threads(1)
