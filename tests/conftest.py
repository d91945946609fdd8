import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)  # two torch jobs at once slow each ~8× on 2 cores: never more threads


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize(model, std=0.05):
    """Non-zero weights everywhere (adaLN-Zero would make a fresh model output exactly 0)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def save_tiny_base(path: str) -> str:
    """A tiny random MMDiT checkpoint with MiniLM conditioning on pixels: the base of the trainer tests."""
    import json

    from base_model.mmdit import MMDiT, preset

    torch.manual_seed(0)
    randomize(MMDiT(preset("toy", depth=2, hidden=32, heads=2)), std=0.02).save_pretrained(path)
    with open(os.path.join(path, "conditioning.json"), "w") as f:
        json.dump({"text_encoders": ["minilm"], "image_space": "pixels", "resolution": 32}, f)
    return path


@pytest.fixture
def reset_accelerate():
    """accelerate keeps process state in singletons: reset it after each in-process training run."""
    yield
    from accelerate.state import AcceleratorState, PartialState
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


@pytest.fixture
def chromium():
    """Debian's headless Chromium driven by Playwright (nothing downloaded); .ci/run installs it."""
    if not os.path.isfile(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        yield browser
        browser.close()
