"""bench/ctf.py peer runner: teamtomo's torch-ctf-estimation on micrographs listed in a manifest (own venv).

Run by bench/ctf.py as ``.bench-envs/teamtomo/bin/python bench/_peer_teamtomo.py MANIFEST OUT_JSON``; never imported
by cryolive. The manifest (JSON) lists MRC micrographs and the optics; the output JSON has, per micrograph, the
CTF in RELION's convention (defocus U ≥ V in Å, angle of U from the X axis in degrees) and the seconds it took.

torch-ctf-estimation declares torchvision for one call, ``torchvision.transforms.functional.gaussian_blur`` (a
separable Gaussian blur with reflect padding of its background estimate). PyPI's torchvision does not load beside
the CPU torch 2.13.0 used here, so this script registers a module with that one function, written from its
documented definition (kernel ``exp(-x²/2σ²)`` on ``x = -(k-1)/2 … (k-1)/2``, normalised; reflect padding).

Conventions (checked against the simulator's truth by bench/ctf.py): ``result2d.defocus_u/defocus_v`` are in µm and
``astigmatism_angle`` in degrees, measured in the array's (x = column, y = row) frame like RELION's.
"""

from __future__ import annotations

import json
import sys
import time
import types


def _install_gaussian_blur_module() -> None:
    import torch
    import torch.nn.functional as F

    def gaussian_blur(img, kernel_size, sigma=None):
        ks = [kernel_size, kernel_size] if isinstance(kernel_size, int) else list(kernel_size)
        if sigma is None:
            sig = [0.3 * ((k - 1) * 0.5 - 1) + 0.8 for k in ks]
        else:
            sig = [float(sigma)] * 2 if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
        x = img
        shape = x.shape
        x = x.reshape(-1, 1, shape[-2], shape[-1])
        kernels = []
        for k, s in zip(ks, sig):
            t = torch.linspace(-(k - 1) * 0.5, (k - 1) * 0.5, k, dtype=x.dtype, device=x.device)
            g = torch.exp(-0.5 * (t / s) ** 2)
            kernels.append(g / g.sum())
        kx, ky = kernels  # torchvision: kernel_size = [kx, ky]
        x = F.pad(x, [kx.numel() // 2, kx.numel() // 2, ky.numel() // 2, ky.numel() // 2], mode="reflect")
        x = F.conv2d(x, kx.view(1, 1, 1, -1))
        x = F.conv2d(x, ky.view(1, 1, -1, 1))
        return x.reshape(shape)

    tv = types.ModuleType("torchvision")
    tr = types.ModuleType("torchvision.transforms")
    fn = types.ModuleType("torchvision.transforms.functional")
    fn.gaussian_blur = gaussian_blur
    tr.functional = fn
    tv.transforms = tr
    sys.modules.setdefault("torchvision", tv)
    sys.modules.setdefault("torchvision.transforms", tr)
    sys.modules.setdefault("torchvision.transforms.functional", fn)


def main(argv: list[str]) -> None:
    _install_gaussian_blur_module()
    import torch

    torch.set_num_threads(1)
    import torch_ctf_estimation as tce

    if argv and argv[0] == "--check":
        print("teamtomo ok: torch-ctf-estimation", tce.__version__, "torch", torch.__version__)
        return
    import mrcfile

    manifest_path, out_path = argv[:2]
    man = json.load(open(manifest_path))
    o = man["optics"]
    band = man["band_angstrom"]  # (low, high) resolution of the fit, Å
    df_range = man["defocus_range_angstrom"]
    results = {}
    for item in man["micrographs"]:
        img = torch.from_numpy(mrcfile.read(item["path"]).astype("float32"))
        t0 = time.perf_counter()
        optical = tce.OpticalParams(pixel_spacing_angstroms=o["pixel_size_angstrom"], voltage_kev=o["voltage_kv"],
                                    spherical_aberration_mm=o["cs_mm"],
                                    amplitude_contrast_fraction=o["amplitude_contrast"],
                                    target_pixel_spacing_angstroms=o["pixel_size_angstrom"])  # no rescaling
        fitting = tce.CTFFittingParams(defocus_grid_resolution=(1, 1, 1), frequency_fit_range_angstroms=tuple(band),
                                       defocus_range_microns=(df_range[0] / 1e4, df_range[1] / 1e4),
                                       patch_sidelength=man.get("tile_size_px", 512))
        _, r1, r2 = tce.estimate_ctf(img, optical, fitting, device=torch.device("cpu"))
        seconds = time.perf_counter() - t0
        u = float(r2.defocus_u) * 1e4
        v = float(r2.defocus_v) * 1e4
        ang = float(r2.astigmatism_angle or 0.0)
        if v > u:
            u, v, ang = v, u, ang + 90.0
        ang = (ang + 90.0) % 180.0 - 90.0
        results[item["name"]] = dict(defocus_u=u, defocus_v=v, defocus_angle_deg=ang, seconds=seconds,
                                     raw=dict(defocus_u_um=float(r2.defocus_u), defocus_v_um=float(r2.defocus_v),
                                              astigmatism_angle=float(r2.astigmatism_angle or 0.0),
                                              defocus_1d_um=float(r1.ctf_model.defocus_um)))
        print(item["name"], results[item["name"]], flush=True)
    json.dump({"peer": "torch-ctf-estimation " + tce.__version__, "results": results}, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
