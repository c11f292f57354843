"""Shared pieces of the networks: devices, seeding, input checks, splits, checkpoints."""
from __future__ import annotations

import contextlib
import os
import pickle

import numpy as np
import torch

from .._util import atomic_path, describe_bad

__all__ = ["resolve_device", "seeded", "prepare_spectra", "prepare_labels", "split_indices",
           "save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]

#: Name and version written into every checkpoint; a mismatch on load is an error.
CHECKPOINT_FORMAT = "cannon_fast.nn"
CHECKPOINT_VERSION = 1
#: The missing-label marker of the APOGEE releases (in addition to NaN).
MISSING_VALUE = -9999.0


def resolve_device(device="auto"):
    """Return a ``torch.device``: CUDA when present for ``"auto"``, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def seeded(seed, device):
    """Seed torch inside the block, restoring the caller's RNG and determinism settings.

    On the CPU, the same seed gives bit-identical training and MC-dropout
    samples; deterministic algorithms are switched on (``warn_only`` so that an
    op without a deterministic GPU kernel does not fail on CUDA).
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    was_det = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_det, warn_only=was_warn)


def prepare_spectra(flux, ivar=None, n_pixels=None, name="flux"):
    """Check spectra and fill masked pixels with the continuum (1).

    A pixel is masked where ``ivar == 0``. Non-finite flux is only allowed at
    masked pixels: a NaN where the inverse variance claims a measurement is an
    error, never silently replaced.

    Parameters
    ----------
    flux : array_like, (N, P)
        Continuum-normalized flux.
    ivar : array_like, (N, P), optional
        Inverse variances; without them every pixel must be finite.
    n_pixels : int, optional
        Pixel count the model was trained on; anything else is an error.
    name : str
        Name of the flux argument in error messages.

    Returns
    -------
    filled : ndarray, (N, P) float32
        Flux with masked pixels set to 1.
    good : ndarray, (N, P) bool
        False at masked pixels.
    """
    flux = np.asarray(flux)
    if flux.ndim == 1:
        flux = flux[None, :]
    if flux.ndim != 2:
        raise ValueError(f"{name} must be (N, P), got shape {flux.shape}")
    if n_pixels is not None and flux.shape[1] != n_pixels:
        raise ValueError(f"{name} has {flux.shape[1]} pixels but the model was trained on "
                         f"{n_pixels}; resample the spectra onto the training grid "
                         "(no silent reshape)")
    if ivar is None:
        good = np.ones(flux.shape, bool)
    else:
        ivar = np.asarray(ivar)
        if ivar.ndim == 1:
            ivar = ivar[None, :]
        if ivar.shape != flux.shape:
            raise ValueError(f"ivar has shape {ivar.shape} but {name} has shape {flux.shape}")
        if np.any(ivar < 0) or not np.all(np.isfinite(ivar)):
            raise ValueError("ivar must be finite and >= 0")
        good = ivar > 0
    nonfinite = ~np.isfinite(flux) & good
    if nonfinite.any():
        hint = ("set ivar = 0 at those pixels to mask them" if ivar is not None
                else "pass ivar with 0 at those pixels to mask them")
        raise ValueError(f"{name} is NaN/inf at unmasked pixels: {describe_bad(nonfinite)}; {hint}")
    filled = np.where(good, flux, 1.0).astype(np.float32)
    return filled, good


def prepare_labels(labels, n_labels, missing_value=MISSING_VALUE, name="labels"):
    """Return labels as float64 (N, L) with missing values (NaN or the marker) as NaN.

    Raises
    ------
    ValueError
        If the shape is wrong or a star has every label missing.
    """
    labels = np.array(labels, dtype=np.float64)
    if labels.ndim == 1 and n_labels == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or labels.shape[1] != n_labels:
        raise ValueError(f"{name} must be (N, {n_labels}), got shape {labels.shape}")
    missing = ~np.isfinite(labels)
    if missing_value is not None:
        missing |= labels == missing_value
    labels[missing] = np.nan
    empty = missing.all(axis=1)
    if empty.any():
        raise ValueError(f"{name}: every label is missing for {describe_bad(empty)}; remove "
                         "those stars (a star with at least one label is kept, and the loss "
                         "ignores its missing ones)")
    return labels


def split_indices(n, fractions=(5, 1, 2), seed=0):
    """Seeded random split of ``range(n)`` into train/validation/test by ratio.

    Parameters
    ----------
    n : int
    fractions : (float, float, float)
        Relative sizes (normalized); the test part may be 0.
    seed : int

    Returns
    -------
    train, val, test : ndarray of int
    """
    f = np.asarray(fractions, float)
    if f.shape != (3,) or np.any(f < 0) or f[0] <= 0 or f[1] <= 0:
        raise ValueError(f"split must be three ratios with train, validation > 0, got {fractions}")
    f = f / f.sum()
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(round(f[0] * n))
    n_val = max(1, int(round(f[1] * n)))
    if n_train < 1 or n_train + n_val > n:
        raise ValueError(f"too few stars ({n}) for the split {tuple(fractions)}")
    return (np.sort(order[:n_train]), np.sort(order[n_train:n_train + n_val]),
            np.sort(order[n_train + n_val:]))


def save_checkpoint(path, kind, config, state_dict, extra):
    """Write a checkpoint that ``torch.load(..., weights_only=True)`` can read.

    Only tensors, numbers, strings, lists and dicts go in: no pickled classes.
    """
    from .. import __version__

    payload = {
        "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "kind": kind,
        "cannon_fast_version": __version__, "torch_version": str(torch.__version__),
        "config": dict(config),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
    }
    payload.update(extra)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path, kind):
    """Read a checkpoint written by :func:`save_checkpoint`, checking kind and version.

    Raises
    ------
    ValueError
        If the file is not a cannon_fast checkpoint, holds another kind of
        network, or was written by another checkpoint format version.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        raise ValueError(f"{path} is not a readable cannon_fast.nn checkpoint "
                         f"(loaded with weights_only=True): {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a cannon_fast.nn checkpoint")
    if payload.get("format_version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} has checkpoint format version {payload.get('format_version')} "
                         f"(written by cannon_fast {payload.get('cannon_fast_version')}); this "
                         f"cannon_fast reads version {CHECKPOINT_VERSION}: retrain the network")
    if payload.get("kind") != kind:
        raise ValueError(f"{path} holds a {payload.get('kind')!r} network, not a {kind!r}")
    return payload
