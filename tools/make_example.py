"""Make the README's example: a 128x128 crop of a clean image and its noisy copy (Gaussian, sigma=25/255).

    python tools/make_example.py ../shared/data/dip-repo/denoising/F16_GT.png examples/
writes examples/F16_clean128.png and examples/F16_noisy128.png (noise from numpy's default_rng(0)).
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def main(src: str, dst: str, size: int = 128, sigma: float = 25.0) -> None:
    img = np.asarray(Image.open(src).convert("RGB"), dtype=np.float32) / 255
    h, w = img.shape[:2]
    y, x = (h - size) // 2, (w - size) // 2
    crop = img[y:y + size, x:x + size]
    noisy = np.clip(crop + np.random.default_rng(0).normal(0, sigma / 255, crop.shape), 0, 1)
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(src).stem.replace("_GT", "")
    Image.fromarray(np.rint(crop * 255).astype(np.uint8)).save(out / f"{stem}_clean{size}.png")
    Image.fromarray(np.rint(noisy * 255).astype(np.uint8)).save(out / f"{stem}_noisy{size}.png")
    print(out / f"{stem}_noisy{size}.png")


if __name__ == "__main__":
    main(*sys.argv[1:3])
