"""Time preparing an image folder (decode + resize + cache) and sampling episodes from it.

Generates ``--classes`` x ``--per-class`` JPEG images (random sizes 100-500 pixels a side, like
the ImageNet photographs mini-ImageNet is cut from; or ``--source-size`` pixels square) into a
temporary folder, then times:

- preparing it: ``load_image_folder(root, 84, 3)`` with an empty cache (decode every file,
  resize to 84x84 RGB, write the cached array), in 1 and in ``--workers`` processes: images/s;
- loading it again from the cache (the folder unchanged: only its file list is checked);
- ``EpisodeSampler.sample(meta_batch)`` of 5-way 1-shot 15-query 84x84 RGB episodes (the MAML
  paper's mini-ImageNet shape), drawn from the train part: meta-batches/s and images/s;
- the memory of preparing: in a fresh process, the rise of its peak resident set over
  ``read_folder`` in ``--workers`` processes, beside the array's size (``prepare_peak_megabytes``,
  ``array_megabytes``).

Preparing is one pass over the files, so its time grows linearly with the number of images
(and falls with the processes, up to the cores that are free): 60,000 images (mini-ImageNet) take 60,000 / (images/s) seconds. Sampling does not
depend on the number of images in the folder (one index_select from the cached array).

    python benchmarks/folder.py --classes 100 --per-class 60 --json benchmarks/results/folder.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from maml_step import cpu_description  # noqa: E402

from metalearn.data import folder as folder_module  # noqa: E402
from metalearn.data.folder import folder_split, load_image_folder  # noqa: E402
from metalearn.tasks.episodes import EpisodeSampler  # noqa: E402


def generate(root: Path, classes: int, per_class: int, source_size: int | None, seed: int) -> int:
    """Photographs stand-ins: a smooth colour gradient per class plus noise, saved as JPEG."""
    rng = np.random.default_rng(seed)
    total_bytes = 0
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        base = rng.integers(0, 256, 3)
        for i in range(per_class):
            w, h = (source_size, source_size) if source_size else rng.integers(100, 501, 2)
            ramp = np.linspace(0, 1, int(w))[None, :, None] * np.linspace(0, 1, int(h))[:, None, None]
            pixels = (base * ramp + rng.normal(0, 25, (int(h), int(w), 3))).clip(0, 255).astype(np.uint8)
            path = folder / f"{i:05d}.jpg"
            Image.fromarray(pixels, "RGB").save(path, quality=85)
            total_bytes += path.stat().st_size
    return total_bytes


# VmRSS and VmHWM (this process's own peak; getrusage's ru_maxrss would start at the parent's)
MEMORY_PROBE = """
import json, re, sys
from pathlib import Path
from metalearn.data import folder
kb = lambda field: int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
folder.PARALLEL_FROM = 0
before = kb("VmRSS")
images = folder.read_folder(sys.argv[1], int(sys.argv[2]), 3, workers=int(sys.argv[3])).images
print(json.dumps({"prepare_peak_megabytes": (kb("VmHWM") - before) / 1e3, "array_megabytes": images.nbytes / 1e6}))
"""


def prepare_memory(root: Path, image_size: int, workers: int) -> dict:
    """The rise of a fresh process's peak resident set over decoding the folder (Linux)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(root), str(image_size), str(workers)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--source-size", type=int, default=None,
                   help="pixels a side of every generated image (default: random 100-500, as photographs)")
    p.add_argument("--image-size", type=int, default=84)
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--query", type=int, default=15)
    p.add_argument("--iters", type=int, default=200, help="timed sample() calls")
    p.add_argument("--threads", type=int, default=1, help="torch threads while sampling")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="decoding processes (also timed with 1)")
    p.add_argument("--note", default="", help="recorded with the result, e.g. 'machine shared with 4 other engineers'")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "load_average": os.getloadavg(), "cpus": os.cpu_count(), "cpu": cpu_description(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "images", Path(tmp) / "cache"
        start = time.perf_counter()
        size = generate(root, args.classes, args.per_class, args.source_size, 0)
        n = args.classes * args.per_class
        result["generate_s"] = time.perf_counter() - start
        result["images"], result["jpeg_megabytes"] = n, size / 1e6

        folder_module.PARALLEL_FROM = 0  # --workers as given, whatever the count
        for workers in sorted({1, args.workers}):
            shutil.rmtree(cache, ignore_errors=True)
            folder_module._LOADED.clear()
            start = time.perf_counter()
            folder = load_image_folder(root, args.image_size, 3, cache_dir=cache, workers=workers)
            folder.images  # the images are decoded (and cached) on first use
            prepare = time.perf_counter() - start
            result[f"prepare_s_{workers}_workers"] = prepare
            result[f"prepare_images_per_s_{workers}_workers"] = n / prepare
        result["cache_megabytes"] = sum(f.stat().st_size for f in cache.iterdir()) / 1e6

        result.update(prepare_memory(root, args.image_size, args.workers))

        folder_module._LOADED.clear()
        start = time.perf_counter()
        again = load_image_folder(root, args.image_size, 3, cache_dir=cache)
        again.images
        result["cached_load_s"] = time.perf_counter() - start
        assert again.content_hash == folder.content_hash

    pool = folder_split(folder, "train")
    sampler = EpisodeSampler(torch.from_numpy(folder.images), pool, args.ways, args.shots, args.query,
                             class_sizes=torch.from_numpy(folder.class_sizes))
    generator = torch.Generator().manual_seed(0)
    times = []
    for i in range(args.iters + 5):
        start = time.perf_counter()
        sampler.sample(args.meta_batch, generator)
        if i >= 5:
            times.append(time.perf_counter() - start)
    per_batch = statistics.median(times)
    images = args.meta_batch * args.ways * (args.shots + args.query)
    result["sample_median_ms"] = per_batch * 1e3
    result["meta_batches_per_s"] = 1 / per_batch
    result["sampled_images_per_s"] = images / per_batch
    result["seconds_for_60000_images"] = 60000 / result[f"prepare_images_per_s_{args.workers}_workers"]
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    from metalearn.errors import MetalearnError

    try:
        main()
    except MetalearnError as err:  # bad settings, e.g. more ways than the generated classes' train part
        raise SystemExit(f"folder.py: {err}") from None
