"""Frame preprocessing: exact area (box-filter) resize, as a numba kernel and a numpy reference.

Area resize maps an input of H x W pixels onto h x w output pixels; output pixel (o, p) is the mean of
the input over the rectangle [o*H/h, (o+1)*H/h) x [p*W/w, (p+1)*W/w), with partially covered input
pixels weighted by the covered fraction (this is OpenCV's INTER_AREA for shrinking, and it is exact for
non-integer ratios). Measured on a grid refined h*w times, every overlap is an integer, so

    out[o, p, c] = round( sum_{i,j} ov_y[o, i] * ov_x[p, j] * x[i, j, c] / (H * W) )

with integer overlaps ``ov``: both implementations compute this sum exactly in integers (the numpy one
in float64, exact because every partial sum is an integer below 2**53) and round half up, so they agree
bit for bit.
"""

from __future__ import annotations

import numba
import numpy as np

Size = int | tuple[int, int]


def _out_hw(size: Size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, (int, np.integer)) else size
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return int(h), int(w)


def overlap_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Integer overlaps int64 [n_out, n_in]: length of output cell o intersected with input pixel i,
    in units of 1/n_out input pixels (each row sums to n_in, each column to n_out)."""
    o = np.arange(n_out)[:, None]
    i = np.arange(n_in)[None, :]
    lo = np.maximum(o * n_in, i * n_out)
    hi = np.minimum((o + 1) * n_in, (i + 1) * n_out)
    return np.maximum(hi - lo, 0).astype(np.int64)


def _sparse_overlaps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index: first covered input index int64 [n_out], count int64 [n_out] and weights
    int64 [n_out, kmax] (zero-padded)."""
    dense = overlap_matrix(n_in, n_out)
    nz = dense > 0
    first = nz.argmax(axis=1).astype(np.int64)
    count = nz.sum(axis=1).astype(np.int64)
    kmax = int(count.max())
    weights = np.zeros((n_out, kmax), np.int64)
    for o in range(n_out):
        weights[o, : count[o]] = dense[o, first[o] : first[o] + count[o]]
    return first, count, weights


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise TypeError(f"frames must be uint8 [..., H, W, C], got dtype {frames.dtype}")
    if frames.ndim < 3:
        raise ValueError(f"frames must be uint8 [..., H, W, C], got shape {frames.shape}")
    return frames


def _area_resize_py(x, y_first, y_count, y_w, x_first, x_count, x_w, out):  # pragma: no cover - jit
    n, h_in, w_in, c = x.shape
    h_out = out.shape[1]
    w_out = out.shape[2]
    denom = np.int64(h_in) * np.int64(w_in)
    for f in range(n):
        # horizontal pass: tmp[i, p, ch] = sum_j ov_x[p, j] * x[f, i, j, ch]  (exact integers)
        tmp = np.zeros((h_in, w_out, c), np.int64)
        for i in range(h_in):
            for p in range(w_out):
                j0 = x_first[p]
                for k in range(x_count[p]):
                    wgt = x_w[p, k]
                    for ch in range(c):
                        tmp[i, p, ch] += wgt * np.int64(x[f, i, j0 + k, ch])
        # vertical pass and round half up: (2*acc + denom) // (2*denom)
        for o in range(h_out):
            i0 = y_first[o]
            for p in range(w_out):
                for ch in range(c):
                    acc = np.int64(0)
                    for k in range(y_count[o]):
                        acc += y_w[o, k] * tmp[i0 + k, p, ch]
                    out[f, o, p, ch] = np.uint8((2 * acc + denom) // (2 * denom))


# Serial on purpose: numba's parallel=True picks the GNU OpenMP threading layer here, which aborts a
# forked DataLoader worker once the parent has used it, and splitting batches over a thread pool
# measured no faster on the 2-core machines (benchmarks/resize.py). Parallelism comes from processes.
_area_resize_kernel = numba.njit(cache=True, nogil=True)(_area_resize_py)


_CACHE: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    key = (n_in, n_out)
    if key not in _CACHE:
        _CACHE[key] = _sparse_overlaps(n_in, n_out)
    return _CACHE[key]


def area_resize(frames: np.ndarray, size: Size) -> np.ndarray:
    """Area-resize uint8 frames [..., H, W, C] to uint8 [..., h, w, C] (numba kernel).

    ``size`` is the square side or ``(h, w)``. Works on one frame [H, W, C] and on any batch shape.
    A frame already at the target size is returned as a copy.
    """
    frames = _check_frames(frames)
    h_out, w_out = _out_hw(size)
    *lead, h_in, w_in, c = frames.shape
    if (h_in, w_in) == (h_out, w_out):
        return frames.copy()
    flat = np.ascontiguousarray(frames.reshape(-1, h_in, w_in, c))
    out = np.empty((flat.shape[0], h_out, w_out, c), np.uint8)
    _area_resize_kernel(flat, *_axis(h_in, h_out), *_axis(w_in, w_out), out)
    return out.reshape(*lead, h_out, w_out, c)


def area_resize_reference(frames: np.ndarray, size: Size) -> np.ndarray:
    """The obvious numpy version of :func:`area_resize`: two float64 matrix products with the
    overlap matrices, then exact rounding. Same inputs, outputs and results."""
    frames = _check_frames(frames)
    h_out, w_out = _out_hw(size)
    *lead, h_in, w_in, c = frames.shape
    wy = overlap_matrix(h_in, h_out).astype(np.float64)  # [h, H]
    wx = overlap_matrix(w_in, w_out).astype(np.float64)  # [w, W]
    x = frames.reshape(-1, h_in, w_in, c).astype(np.float64)
    acc = np.einsum("oh,nhwc->nowc", wy, x, optimize=True)  # [N, h, W, C]
    acc = np.einsum("pw,nowc->nopc", wx, acc, optimize=True)  # [N, h, w, C]
    acc = np.rint(acc).astype(np.int64)  # already integral; rint guards against -0.0 / tiny drift
    denom = h_in * w_in
    out = ((2 * acc + denom) // (2 * denom)).astype(np.uint8)
    return out.reshape(*lead, h_out, w_out, c)


def to_hwc_uint8(frame: np.ndarray, *, name: str = "frame") -> np.ndarray:
    """A raw env frame as uint8 [H, W, C]: accepts uint8 [H, W, C] or grayscale uint8 [H, W] (-> C=1)."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        raise TypeError(f"{name} must be a uint8 image [H, W, C] or [H, W], got dtype {frame.dtype} "
                        f"and shape {frame.shape}")
    if frame.ndim == 2:
        return frame[:, :, None]
    if frame.ndim != 3:
        raise ValueError(f"{name} must be a uint8 image [H, W, C] or [H, W], got shape {frame.shape}")
    return frame


def preprocess_frame(frame: np.ndarray, size: Size) -> np.ndarray:
    """The dataset's preprocessing of one raw env frame: uint8 [H, W, C] or [H, W] -> uint8 [h, w, C]."""
    return area_resize(to_hwc_uint8(frame), size)
