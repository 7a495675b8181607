import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# the app's model cards: a quick specialisation test (a checkpoint's cached card with more draws still serves)
os.environ.setdefault("WORKBENCH_CARD_DRAWS", "10")
os.environ.setdefault("WORKBENCH_CARD_IMAGES", "64")

import pytest  # noqa: E402
import torch  # noqa: E402

import workbench  # noqa: E402,F401  (registers the models)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
