"""Session fixtures: each real model is loaded and converted once per test run."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


@dataclass
class Reference:
    name: str
    hf: object  # transformers model loaded straight from the shipped GGUF: the reference
    tokenizer: object
    home: Path


@pytest.fixture(scope="session")
def helios_home(tmp_path_factory) -> Path:
    home = Path(os.environ.get("HELIOS_HOME") or tmp_path_factory.mktemp("helios_home"))
    os.environ["HELIOS_HOME"] = str(home)
    return home


def _reference(name: str, home: Path) -> Reference:
    from engine.store import convert, load_hf, resolve_source

    source = resolve_source(name)
    hf, tokenizer = load_hf(source)
    if not (home / source.name / "manifest.json").is_file():
        convert(hf, tokenizer, home / source.name)
    return Reference(name, hf, tokenizer, home)


@pytest.fixture(scope="session")
def smollm2(helios_home) -> Reference:
    return _reference("smollm2", helios_home)


@pytest.fixture(scope="session")
def gemma3(helios_home) -> Reference:
    return _reference("gemma3", helios_home)


@pytest.fixture(scope="session")
def smollm2_calibrated(smollm2):
    """SmolLM2 with exit heads trained by the real calibration pipeline on a small budget."""
    from engine.calibrate import CalibrationConfig, calibrate

    report = calibrate(CalibrationConfig(model="smollm2", num_prompts=8, max_new_tokens=24, steps=20,
                                         predictor_steps=100, home=smollm2.home))
    return smollm2, report


def shipped_only(home: Path, into: Path, model: str = "smollm2") -> Path:
    """A HELIOS_HOME with the converted model linked in but no calibration of its own: engines
    there serve the exit heads shipped with the package."""
    store = into / model
    store.mkdir(parents=True, exist_ok=True)
    for f in (home / model).iterdir():
        if f.name != "exits":
            (store / f.name).symlink_to(f)
    return into


def hf_greedy(ref: Reference, prompt: str, max_new_tokens: int) -> list[int]:
    ids = ref.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = ref.hf.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids["input_ids"].shape[1]:].tolist()


PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "Write a haiku about the sea.\n",
    "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n",
]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """REDIS_URL when set; otherwise a private redis-server on a free port for this test run."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()


class RedisServer:
    """A real redis-server process on a free port (restartable on the same port)."""

    def __init__(self, workdir: Path):
        import shutil
        import socket

        if not shutil.which("redis-server"):
            pytest.fail("redis-server is not installed (apt-get install redis-server) and REDIS_URL is unset")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.workdir, self.url = workdir, f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self):
        import subprocess
        import time

        import redis

        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)], stdout=subprocess.DEVNULL)
        for _ in range(100):
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
