"""Run topaz-em (its pretrained model) on micrographs and write its picks and timings as JSON.

Executed by the peer's own interpreter (``.bench-envs/topaz/bin/python``, made by ``bench/setup_picking_peers.sh``)
in a separate process by ``bench/picking.py``; it imports nothing from cryolive. topaz is GPL-3: it is used here
only as a separate program.

    .bench-envs/topaz/bin/python bench/_peer_topaz.py OUT.json --scale 8 --radius 8 MIC1.mrc MIC2.mrc ...

It calls topaz's own command entry points, as ``topaz preprocess`` and ``topaz extract`` would (the ``topaz``
dispatcher itself also imports the training commands, which need torchvision, which is not installed beside
the CPU torch): preprocess downsamples by ``--scale`` and normalises each micrograph (topaz's GMM
normalisation), extract scores it with the default pretrained model (resnet16, 64 units) and extracts peaks
with non-maximum suppression of ``--radius`` (downsampled px) down to ``--threshold`` (topaz's default -6).
Coordinates are scaled back to the input micrographs by ``--scale`` (x = column, y = row, from the top left, as
topaz writes them). Timings: wall-clock and CPU seconds of each step in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("micrographs", nargs="+")
    ap.add_argument("--scale", type=int, default=8)
    ap.add_argument("--radius", type=int, default=8)
    ap.add_argument("--threshold", type=float, default=-6.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    w0, c0 = time.perf_counter(), time.process_time()
    import topaz.commands.extract as topaz_extract
    import topaz.commands.preprocess as topaz_preprocess

    import_s = (time.perf_counter() - w0, time.process_time() - c0)
    with tempfile.TemporaryDirectory() as tmp:
        pre_dir = os.path.join(tmp, "pre")
        os.makedirs(pre_dir)
        p = argparse.ArgumentParser()
        topaz_preprocess.add_arguments(p)
        pre_args = p.parse_args(["-s", str(args.scale), "-o", pre_dir, "-j", str(args.threads), "-d", "-1",
                                 *args.micrographs])
        pre_s = _timed(lambda: topaz_preprocess.main(pre_args))
        picks_path = os.path.join(tmp, "picks.txt")
        e = argparse.ArgumentParser()
        topaz_extract.add_arguments(e)
        pre_files = [os.path.join(pre_dir, os.path.basename(m)) for m in args.micrographs]
        ex_args = e.parse_args(["-r", str(args.radius), "-t", str(args.threshold), "-x", str(args.scale),
                                "-j", str(args.threads), "-d", "-1", "-o", picks_path, *pre_files])
        ex_s = _timed(lambda: topaz_extract.main(ex_args))
        picks: dict[str, list] = {os.path.splitext(os.path.basename(m))[0]: [] for m in args.micrographs}
        with open(picks_path) as f:
            header = f.readline().split()
            col = {name: i for i, name in enumerate(header)}
            for line in f:
                parts = line.split()
                if not parts:
                    continue
                name = parts[col["image_name"]]
                picks.setdefault(name, []).append(
                    [float(parts[col["y_coord"]]), float(parts[col["x_coord"]]), float(parts[col["score"]])])
    with open(args.out, "w") as f:
        json.dump(dict(picks=picks, import_s=import_s, preprocess_s=pre_s, extract_s=ex_s,
                       topaz_version=__import__("topaz").__version__, torch_version=torch.__version__), f)


if __name__ == "__main__":
    main()
