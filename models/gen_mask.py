#!/usr/bin/env python3
"""Procedurally generate the LatentSync lower-face keep-mask.

LatentSync conditions the UNet on a fixed, face-independent mask
(``latentsync/utils/mask.png`` in bytedance/LatentSync, 256x256 RGB, binary 0/255).
All released UNet configs point at that file. This script redraws it from a geometric
description (measured from the published image; no pixels or code are copied), so the
service neither ships nor downloads the image.

Convention (same as the reference):
  white = 255 (1.0) = KEEP the original pixels,
  black = 0   (0.0) = the region the model generates (lower face + cheeks).
The reference loads it with OpenCV, resizes it to the crop resolution with
``cv2.INTER_LANCZOS4`` (identity at 256 px, soft edges at 512 px), divides by 255 and uses
channel 0. For the UNet it is resized again to the latent size (resolution/8) with
nearest-neighbour interpolation. After VAE decoding the crop is composed as
``decoded * (1 - mask) + original * mask``.

Geometry, in the 256x256 reference frame (x = column, y = row, both 0-based pixel indices,
ranges inclusive). Black pixels cover 40.70 % of the image, rows 95..242, cols 9..247:

  * two cheek patches, rows 95..127: cols 9..77 (image left) and 178..246 (image right);
    the 100 columns between them (78..177, around the nose) stay white above row 128;
  * a lower-face band, rows 128..242, spanning cols [L(y), R(y)] in each row. L and R are
    piecewise-linear between the knots below, rounded half-up (floor(v + 0.5)). The band
    is almost full-width down to row ~170 (slight taper 9 -> 12 on the left,
    247 -> 243 on the right), then closes in a slightly asymmetric "U" towards the chin,
    whose last row 242 spans cols 131..152.

These knots reproduce the published 256 px image exactly (pixel-for-pixel).

Rendering at another resolution:
  * ``--filter lanczos4`` (default): draw the exact 256 px binary mask, then resize it with a
    separable Lanczos kernel (a = 4, 8 taps, pixel-centre aligned, edge replicate), rounded
    and saturated to uint8: the same maths as the reference's cv2.INTER_LANCZOS4 resize.
    OpenCV uses 11-bit fixed-point coefficients for uint8, so values may differ by one
    grey level on the soft edges.
  * ``--filter area``: exact area coverage of the continuous shape (supersampled 8x8),
    no ringing.
  * ``--filter nearest``: hard binary mask.

Usage:
  python models/gen_mask.py --resolution 512 --out models/generated/latentsync-1.6/mask.png
  python models/gen_mask.py --resolution 256 --out mask.npy     # float32 [H, W] in [0, 1]
"""

from __future__ import annotations

import argparse
import math
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

REF_SIZE = 256

# Cheek patches: (row_first, row_last, col_first, col_last), inclusive.
CHEEK_PATCHES = (
    (95, 127, 9, 77),
    (95, 127, 178, 246),
)

# Lower band rows (inclusive) and the knots (row, col) of its left and right borders.
BAND_ROWS = (128, 242)
BAND_LEFT_KNOTS = (
    (128, 9), (157, 11), (170, 12), (179, 17), (189, 23), (196, 29), (207, 39),
    (215, 49), (223, 62), (233, 82), (236, 90), (238, 95), (241, 108), (242, 131),
)
BAND_RIGHT_KNOTS = (
    (128, 247), (169, 244), (178, 239), (196, 227), (206, 218), (214, 210), (215, 208),
    (220, 202), (228, 189), (231, 183), (234, 175), (239, 164), (242, 152),
)


def _border(knots, rows):
    ky = np.array([k[0] for k in knots], dtype=np.float64)
    kx = np.array([k[1] for k in knots], dtype=np.float64)
    return np.floor(np.interp(rows, ky, kx) + 0.5).astype(np.int64)


def band_spans():
    """Per-row (row, first_col, last_col) of the lower band, inclusive."""
    rows = np.arange(BAND_ROWS[0], BAND_ROWS[1] + 1)
    return rows, _border(BAND_LEFT_KNOTS, rows), _border(BAND_RIGHT_KNOTS, rows)


def mask_256() -> np.ndarray:
    """The exact reference mask: uint8 [256, 256], 255 = keep, 0 = generate."""
    m = np.full((REF_SIZE, REF_SIZE), 255, dtype=np.uint8)
    for r0, r1, c0, c1 in CHEEK_PATCHES:
        m[r0:r1 + 1, c0:c1 + 1] = 0
    rows, left, right = band_spans()
    for y, l, r in zip(rows, left, right):
        m[y, l:r + 1] = 0
    return m


def _inside(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Continuous point test in 256-px reference coordinates (pixel k covers [k, k+1))."""
    inside = np.zeros(np.broadcast(xs, ys).shape, dtype=bool)
    for r0, r1, c0, c1 in CHEEK_PATCHES:
        inside |= (ys >= r0) & (ys < r1 + 1) & (xs >= c0) & (xs < c1 + 1)
    rows, left, right = band_spans()
    row = np.floor(ys).astype(np.int64)
    in_rows = (row >= rows[0]) & (row <= rows[-1])
    idx = np.clip(row - rows[0], 0, len(rows) - 1)
    inside |= in_rows & (xs >= left[idx]) & (xs < right[idx] + 1)
    return inside


def _lanczos4_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] resampling matrix, Lanczos a=4, centre-aligned, edge replicate."""
    scale = n_in / n_out
    w = np.zeros((n_out, n_in), dtype=np.float64)
    for o in range(n_out):
        f = (o + 0.5) * scale - 0.5
        s = math.floor(f)
        frac = f - s
        taps = []
        for k in range(-3, 5):
            t = frac - k  # distance from the sample point to source pixel s + k
            if abs(t) < 1e-12:
                c = 1.0
            else:
                c = 4.0 * math.sin(math.pi * t) * math.sin(math.pi * t / 4.0) / (math.pi * math.pi * t * t)
            taps.append((min(max(s + k, 0), n_in - 1), c))
        total = sum(c for _, c in taps)
        for i, c in taps:
            w[o, i] += c / total
    return w


def render(resolution: int, filt: str = "lanczos4") -> np.ndarray:
    """The mask at ``resolution`` x ``resolution`` as uint8 (255 = keep)."""
    if resolution == REF_SIZE or filt == "nearest":
        if resolution == REF_SIZE:
            return mask_256()
        c = (np.arange(resolution) + 0.5) * (REF_SIZE / resolution)
        return np.where(_inside(c[None, :], c[:, None]), 0, 255).astype(np.uint8)
    if filt == "lanczos4":
        m = mask_256().astype(np.float64)
        a = _lanczos4_matrix(resolution, REF_SIZE)
        out = a @ m @ a.T
        return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
    if filt == "area":
        ss = 8
        sub = (np.arange(resolution * ss) + 0.5) * (REF_SIZE / (resolution * ss))
        black = _inside(sub[None, :], sub[:, None]).astype(np.float64)
        cover = black.reshape(resolution, ss, resolution, ss).mean(axis=(1, 3))
        return np.clip(np.floor((1.0 - cover) * 255.0 + 0.5), 0, 255).astype(np.uint8)
    raise ValueError(f"unknown filter {filt!r}")


def png_bytes(gray: np.ndarray) -> bytes:
    """Encode a uint8 [H, W] array as an 8-bit greyscale PNG (deterministic bytes)."""
    assert gray.dtype == np.uint8 and gray.ndim == 2
    h, w = gray.shape

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + gray[y].tobytes() for y in range(h))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def write(path: Path, resolution: int, filt: str = "lanczos4") -> bytes:
    """Write the mask as .png (uint8 greyscale) or .npy (float32 in [0, 1]); returns the bytes."""
    m = render(resolution, filt)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        import io

        buf = io.BytesIO()
        np.save(buf, (m.astype(np.float32) / 255.0), allow_pickle=False)
        data = buf.getvalue()
    else:
        data = png_bytes(m)
    path.write_bytes(data)
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=256, help="output size in px (square); default 256")
    p.add_argument("--out", type=Path, default=Path("mask.png"), help=".png (uint8) or .npy (float32 0..1)")
    p.add_argument("--filter", choices=("lanczos4", "area", "nearest"), default="lanczos4")
    a = p.parse_args(argv)
    if a.resolution < 8:
        p.error("--resolution must be >= 8")
    write(a.out, a.resolution, a.filter)
    m = render(a.resolution, a.filter)
    print(f"{a.out}: {a.resolution}x{a.resolution}, generate-region fraction {1.0 - m.mean() / 255.0:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
