"""Labels -> normalized spectrum: The Payne's MLP, trained with torch, run with numpy.

The network is ``x -> a(W1 x + b1) -> a(W2 . + b2) -> W3 . + b3`` with ``a`` a
LeakyReLU (default), SiLU or tanh (smooth activations follow smooth model spectra,
e.g. ab initio grids, with fewer units) and the labels scaled to
``x = (label - x_min) / (x_max - x_min) - 0.5``; ``[x_min, x_max]`` is the training
box: labels outside it are flagged (``outside_training``), refused with
``predict(..., strict=True)``, and fits stay inside it when the emulator was made with
``extrapolate=0``. An emulator made for a pixel grid (``grid``) keeps it in its file
and refuses spectra of another grid.
After training it is exported to plain arrays (:class:`PayneEmulator`), which
evaluate the spectrum and its analytic Jacobian without torch, so the emulator
is a drop-in forward model for :func:`cannon_fast.fit_spectra`.

References
----------
Ting, Y.-S., Conroy, C., Rix, H.-W. & Cargile, P. 2019, ApJ 879, 69 (The Payne).
"""
from __future__ import annotations

import copy
import os
import time

import numpy as np

from .._util import atomic_path, describe_bad
from .._util import progress as _progress
from ._activations import ACTIVATIONS, _activate, _activation_slope
from ._calibrated import EmulatorFits
from ._files import grid_arrays, grid_from_npz, open_npz

__all__ = ["PayneEmulator", "train_emulator"]

_FORMAT = "cannon_fast.PayneEmulator"
_VERSION = 1
class PayneEmulator(EmulatorFits):
    """A trained labels -> spectrum MLP as numpy arrays (a generic forward model).

    Parameters
    ----------
    weights : sequence of ndarray
        Layer matrices in torch's ``(out, in)`` convention: ``(H1, L)``,
        ``(H2, H1)``, ..., ``(P, H_last)``.
    biases : sequence of ndarray
        ``(H1,)``, ..., ``(P,)``.
    label_names : sequence of str
    x_min, x_max : array_like, (L,)
        Label scaling: ``x = (label - x_min) / (x_max - x_min) - 0.5``.
    training_labels : array_like, (N, L), optional
        Used by fits for starting points (default: the corners' midpoint).
    s2 : array_like, (P,), optional
        Per-pixel model variance added to the noise in fits.
    pixel_flags : array_like, (P,) uint8, optional
        Nonzero where the emulator saw no training data.
    negative_slope : float
        LeakyReLU slope for negative inputs.
    label_bounds : array_like, (L, 2), optional
        Physical bounds for fits (default: the scaling range widened by ``extrapolate``).
    activation : {"leaky_relu", "silu", "tanh"}
        Hidden-layer activation.
    grid : cannon_fast.PixelGrid, optional
        The pixels of the spectra the emulator was trained on.
    extrapolate : float
        Default fit bounds: the training box widened by this fraction of its span
        (0: fits never leave the box).

    Attributes
    ----------
    n_labels, n_pixels : int
    train_info : dict
        What fits need to know of the emulator's misfit to real spectra:
        ``poor_fit_reduced_chi2`` (POOR_FIT's limit) and how it was calibrated
        (:meth:`calibrate`); empty for an emulator of model spectra alone.
    error_model : cannon_fast.core.errors.ErrorModel or None
        Calibrated errors (:meth:`calibrate`), applied by :meth:`fit`.

    Notes
    -----
    ``fit`` and ``calibrate`` come from :class:`cannon_fast.nn._calibrated.EmulatorFits`.
    """

    def __init__(self, weights, biases, label_names, x_min, x_max, training_labels=None,
                 s2=None, pixel_flags=None, negative_slope=0.01, label_bounds=None,
                 activation="leaky_relu", grid=None, extrapolate=0.05):
        self.weights = [np.ascontiguousarray(w, dtype=np.float64) for w in weights]
        self.biases = [np.ascontiguousarray(b, dtype=np.float64) for b in biases]
        self.label_names = tuple(str(n) for n in label_names)
        if len(self.weights) < 2 or len(self.weights) != len(self.biases):
            raise ValueError("need at least two layers and one bias per weight matrix")
        n_in = len(self.label_names)
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            if w.ndim != 2 or w.shape[1] != n_in or b.shape != (w.shape[0],):
                raise ValueError(f"layer {k}: weight {w.shape} / bias {b.shape} do not chain "
                                 f"from {n_in} inputs")
            n_in = w.shape[0]
        self.x_min = np.asarray(x_min, np.float64).reshape(self.n_labels)
        self.x_max = np.asarray(x_max, np.float64).reshape(self.n_labels)
        span = self.x_max - self.x_min
        if np.any(span <= 0):
            raise ValueError("x_max must exceed x_min for every label")
        self.negative_slope = float(negative_slope)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        if grid is not None and grid.n_pixels != self.n_pixels:
            raise ValueError(f"the grid {grid!r} has {grid.n_pixels} pixels, the emulator "
                             f"{self.n_pixels}")
        self.grid = grid
        if label_bounds is None:
            label_bounds = np.column_stack([self.x_min - extrapolate * span,
                                            self.x_max + extrapolate * span])
        self.label_bounds = np.asarray(label_bounds, np.float64).reshape(self.n_labels, 2)
        if training_labels is None:
            training_labels = 0.5 * (self.x_min + self.x_max)[None, :]
        self.training_labels = np.atleast_2d(np.asarray(training_labels, np.float64))
        self.s2 = None if s2 is None else np.asarray(s2, np.float64).reshape(self.n_pixels)
        self.pixel_flags = (np.zeros(self.n_pixels, np.uint8) if pixel_flags is None
                            else np.asarray(pixel_flags, np.uint8).reshape(self.n_pixels))
        self.history = {}
        self.train_info = {}
        self.error_model = None

    @property
    def n_labels(self):
        """L."""
        return len(self.label_names)

    @property
    def n_pixels(self):
        """P."""
        return self.weights[-1].shape[0]

    def _scaled(self, labels):
        labels = np.asarray(labels, np.float64)
        single = labels.ndim == 1
        labels = np.atleast_2d(labels)
        if labels.ndim != 2 or labels.shape[1] != self.n_labels:
            raise ValueError(f"labels must be (N, {self.n_labels}) or ({self.n_labels},), got "
                             f"shape {np.shape(labels)}")
        if not np.all(np.isfinite(labels)):
            raise ValueError("labels must be finite")
        return (labels - self.x_min) / (self.x_max - self.x_min) - 0.5, single

    def _forward(self, x, keep=False):
        """Pre-activations of the hidden layers (if ``keep``) and the output."""
        pre = []
        a = x
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            h = a @ w.T + b  # (N, H)
            pre.append(h)
            a = _activate(self.activation, h, self.negative_slope)
        out = a @ self.weights[-1].T + self.biases[-1]  # (N, P)
        return (out, pre) if keep else out

    def outside_training(self, labels):
        """(N,) bool: a label at or beyond the edge of the training box.

        A fit pinned to the box's edge is flagged too: its label would have
        gone further if the emulator had been allowed to extrapolate.
        """
        x, _ = self._scaled(labels)
        tol = 1e-6
        return np.any((x <= -0.5 + tol) | (x >= 0.5 - tol), axis=1)

    def check_grid(self, grid, what="the spectra"):
        """Refuse spectra of another pixel grid than the emulator's (ValueError naming both)."""
        if grid is None or self.grid is None:
            return
        if grid != self.grid:
            raise ValueError(f"this emulator was trained on the grid {self.grid!r}; {what} are "
                             f"on {grid!r}: train an emulator for that grid")

    def predict(self, labels, strict=False):
        """Return the normalized flux for the labels: (N, L) -> (N, P), (L,) -> (P,).

        With ``strict``, labels outside the training box are an error (an
        emulator extrapolates without warning otherwise).
        """
        if strict:
            x, _ = self._scaled(labels)
            bad = np.any((x < -0.5 - 1e-9) | (x > 0.5 + 1e-9), axis=1)
            if bad.any():
                lab = np.atleast_2d(np.asarray(labels, np.float64))[bad][0]
                raise ValueError(
                    f"{int(bad.sum())} label set(s) outside the emulator's training box, e.g. "
                    + ", ".join(f"{n}={v:g}" for n, v in zip(self.label_names, lab))
                    + "; box: " + ", ".join(f"{n} {a:g}..{b:g}" for n, a, b in
                                            zip(self.label_names, self.x_min, self.x_max)))
        x, single = self._scaled(labels)
        out = self._forward(x)
        return out[0] if single else out

    def predict_with_jacobian(self, labels):
        """Flux and its analytic Jacobian with respect to the physical labels.

        Parameters
        ----------
        labels : array_like, (N, L)

        Returns
        -------
        flux : ndarray, (N, P)
        jac : ndarray, (N, P, L)
            ``d flux / d label`` (chain rule through the LeakyReLU layers; at a
            kink the slope of the positive side is not used, as in torch).
        """
        x, _ = self._scaled(labels)
        out, pre = self._forward(x, keep=True)
        # d x / d label is diagonal: 1 / span
        g = self.weights[0] / (self.x_max - self.x_min)  # (H1, L)
        g = np.broadcast_to(g, (x.shape[0],) + g.shape)
        for k, h in enumerate(pre):
            slope = _activation_slope(self.activation, h, self.negative_slope)  # (N, H)
            g = slope[:, :, None] * g  # (N, H, L)
            g = np.matmul(self.weights[k + 1], g)  # (N, H_next or P, L)
        return out, g

    @staticmethod
    def _fast_fit(emulator, flux, ivar, **kwargs):
        """The Payne's own fast fit (``nn.fast_fit``) for ``fit(method="fast")``."""
        from .fast_fit import fit_emulator

        return fit_emulator(emulator, flux, ivar, **kwargs)

    # ------------------------------------------------------------------ export
    @classmethod
    def from_torch(cls, net, label_names, x_min, x_max, **kwargs):
        """Export a ``torch.nn.Sequential`` of Linear / LeakyReLU layers.

        Parameters
        ----------
        net : torch.nn.Sequential
            ``Linear, LeakyReLU, Linear, LeakyReLU, ..., Linear``.
        label_names, x_min, x_max
            As for the constructor; further keywords are passed on.

        Returns
        -------
        PayneEmulator
        """
        import torch

        mods = list(net)
        kinds = {torch.nn.LeakyReLU: "leaky_relu", torch.nn.SiLU: "silu", torch.nn.Tanh: "tanh"}
        acts = {kinds.get(type(m)) for m in mods[1::2]}
        ok = (len(mods) >= 3 and len(mods) % 2 == 1
              and all(isinstance(m, torch.nn.Linear) for m in mods[::2])
              and None not in acts and len(acts) == 1)
        if not ok:
            raise ValueError("expected Sequential(Linear, LeakyReLU, ..., Linear) (or one of "
                             f"SiLU, Tanh throughout), got {[type(m).__name__ for m in mods]}")
        activation = acts.pop()
        slopes = {getattr(m, "negative_slope", 0.01) for m in mods[1::2]}
        if len(slopes) != 1:
            raise ValueError(f"all LeakyReLU layers must share one slope, got {slopes}")
        weights = [m.weight.detach().cpu().double().numpy() for m in mods[::2]]
        biases = [m.bias.detach().cpu().double().numpy() for m in mods[::2]]
        return cls(weights, biases, label_names, x_min, x_max, negative_slope=slopes.pop(),
                   activation=activation, **kwargs)

    def to_torch(self, dtype=None):
        """Rebuild the ``torch.nn.Sequential`` (float32 by default)."""
        import torch

        dtype = torch.float32 if dtype is None else dtype
        return _build_mlp(self.n_labels, [w.shape[0] for w in self.weights[:-1]],
                          self.n_pixels, self.negative_slope, weights=self.weights,
                          biases=self.biases, dtype=dtype, activation=self.activation)

    def write(self, path):
        """Write the arrays to an ``.npz`` file (no pickle; atomic)."""
        arrays = {
            "format": np.array(_FORMAT), "format_version": np.array(_VERSION),
            "label_names": np.array(self.label_names, dtype=str),
            "x_min": self.x_min, "x_max": self.x_max, "label_bounds": self.label_bounds,
            "training_labels": self.training_labels, "pixel_flags": self.pixel_flags,
            "negative_slope": np.array(self.negative_slope),
            "n_layers": np.array(len(self.weights)),
            "activation": np.array(self.activation),
        }
        arrays.update(self._calibration_arrays())
        arrays.update(grid_arrays(self.grid))
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            arrays[f"W{k}"], arrays[f"b{k}"] = w, b
        arrays.update(self._extra_arrays())
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # a file object: savez would append ".npz" to a name

    @classmethod
    def read(cls, path, grid=None):
        """Read an emulator written by :meth:`write`.

        Parameters
        ----------
        path : str or os.PathLike
        grid : cannon_fast.PixelGrid, optional
            The grid of the spectra it is for: an emulator of another grid (or of
            another pixel count) is refused.

        Raises
        ------
        ValueError
            Not an emulator file, another format version, or another grid.
        """
        path = os.fspath(path)
        with open_npz(path, _FORMAT, _VERSION, "PayneEmulator") as data:
            n = int(data["n_layers"])
            own_grid = grid_from_npz(data)
            n_pix = data[f"W{n - 1}"].shape[0]
            if grid is not None and own_grid is None and grid.n_pixels != n_pix:
                raise ValueError(f"{path} is an emulator of {n_pix} pixels (no grid recorded); "
                                 f"the spectra are on {grid!r}")
            emu = cls([data[f"W{k}"] for k in range(n)], [data[f"b{k}"] for k in range(n)],
                      [str(s) for s in data["label_names"]], data["x_min"], data["x_max"],
                      training_labels=data["training_labels"],
                      pixel_flags=data["pixel_flags"],
                      negative_slope=float(data["negative_slope"]),
                      label_bounds=data["label_bounds"],
                      activation=(str(data["activation"]) if "activation" in data.files
                                  else "leaky_relu"),
                      grid=own_grid)
            emu._read_calibration(data)
            emu._read_extra(data, path)
        emu.check_grid(grid, what=f"the spectra to use {path} with")
        return emu

    # a subclass keeps what it adds (e.g. how it was trained) in the same file
    def _extra_arrays(self):
        return {}

    def _read_extra(self, data, path):
        pass


def _build_mlp(n_labels, hidden, n_pixels, negative_slope, weights=None, biases=None,
               dtype=None, activation="leaky_relu"):
    """``Sequential(Linear, activation, ..., Linear)``, optionally with given weights."""
    import torch

    sizes = [n_labels, *hidden, n_pixels]
    mods = []
    for k in range(len(sizes) - 1):
        mods.append(torch.nn.Linear(sizes[k], sizes[k + 1]))
        if k < len(sizes) - 2:
            mods.append(torch.nn.LeakyReLU(negative_slope) if activation == "leaky_relu"
                        else torch.nn.SiLU() if activation == "silu" else torch.nn.Tanh())
    net = torch.nn.Sequential(*mods)
    if dtype is not None:
        net = net.to(dtype)
    if weights is not None:
        with torch.no_grad():
            for m, w, b in zip(mods[::2], weights, biases):
                m.weight.copy_(torch.as_tensor(w))
                m.bias.copy_(torch.as_tensor(b))
    return net


def held_out_s2(emu, flux, ivar, good, labels):
    """Per-pixel model variance: the held-out stars' residual variance beyond their noise."""
    resid = emu.predict(labels) - flux
    with np.errstate(divide="ignore", invalid="ignore"):
        excess = np.where(good, resid ** 2 - 1.0 / np.where(good, ivar, 1.0), 0.0)
        cnt = good.sum(axis=0)
        return np.where(cnt > 0, np.clip(excess.sum(axis=0) / np.maximum(cnt, 1), 0, None), 0.0)


def training_arrays(flux, ivar, labels, label_names, who):
    """Checked training inputs of an emulator: filled flux, good, ivar (0 where bad), labels.

    ``who`` names the model in the message when a star's labels are incomplete.
    """
    from ._common import prepare_spectra

    filled, good = prepare_spectra(flux, ivar)
    n = len(filled)
    ivar = np.where(good, np.asarray(ivar, np.float64), 0.0)
    labels = np.asarray(labels, np.float64)
    label_names = tuple(label_names)
    if labels.shape != (n, len(label_names)):
        raise ValueError(f"labels must be ({n}, {len(label_names)}), got {labels.shape}")
    if not np.all(np.isfinite(labels)):
        raise ValueError(f"{who} needs complete labels; missing for "
                         + describe_bad(~np.all(np.isfinite(labels), axis=1)))
    return filled, good, ivar, labels, label_names


def train_emulator(flux, ivar, labels, label_names, *, hidden=(300, 300), negative_slope=0.01,
                   validation_fraction=0.2, epochs=1000, batch_size=128, learning_rate=1e-3,
                   patience=30, min_delta=1e-4, sigma_floor=0.0, seed=0, device="auto",
                   progress=None, activation="leaky_relu", grid=None, box=None,
                   extrapolate=0.05, schedule="plateau"):
    """Train The Payne's MLP on normalized spectra with complete labels.

    The loss is the mean chi^2 per unmasked pixel,
    ``ivar_eff * (flux - model)^2`` with ``ivar_eff = ivar / (1 + ivar * sigma_floor^2)``.
    A seeded fraction of the stars is held out for early stopping and for the
    per-pixel model variance ``s2`` (the residual variance beyond the noise).

    Parameters
    ----------
    flux, ivar : array_like, (N, P)
        Normalized spectra; ``ivar == 0`` masks a pixel (its flux may be NaN).
    labels : array_like, (N, L)
        Complete training labels (no NaN).
    label_names : sequence of str
    hidden : sequence of int
        Hidden layer widths (The Payne: two layers).
    negative_slope : float
        LeakyReLU slope.
    validation_fraction : float
    epochs, batch_size, learning_rate : int, int, float
        Adam optimization.
    patience, min_delta : int, float
        Early stopping on the validation chi^2 (relative improvement ``min_delta``).
    sigma_floor : float
        Noise floor added in quadrature, so that no pixel dominates the loss.
    seed : int
    device : str
    progress : bool, optional
    activation : {"leaky_relu", "silu", "tanh"}
    grid : cannon_fast.PixelGrid, optional
        The spectra's pixels, recorded with the emulator.
    box : array_like, (L, 2), optional
        The training box (default: the training labels' range), e.g. the box a
        label design was drawn in.
    extrapolate : float
        Fit bounds: the box widened by this fraction (0: no extrapolation).
    schedule : {"plateau", "onecycle"}
        Learning rate: halved when the validation loss stalls (with early
        stopping), or one cycle up to ``learning_rate`` and down over all
        ``epochs`` (no early stop; the best validation epoch is kept), which
        reaches a lower error on noise-free model spectra in a fixed budget.

    Returns
    -------
    PayneEmulator
        With ``history`` (``train_loss``, ``val_loss``, ``best_epoch``,
        ``train_time``, ``train_cpu_time``, ``val_index``).
    """
    import torch

    from ._common import resolve_device, seeded

    filled, good, ivar, labels, label_names = training_arrays(flux, ivar, labels, label_names,
                                                              "the emulator")
    n, n_pix = filled.shape
    w = ivar / (1.0 + ivar * sigma_floor ** 2)
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(validation_fraction * n)))
    va, tr = np.sort(order[:n_val]), np.sort(order[n_val:])
    if len(tr) < 2:
        raise ValueError(f"too few stars ({n}) to train an emulator")
    if box is not None:
        x_min, x_max = np.asarray(box, np.float64).reshape(len(label_names), 2).T
    else:
        x_min, x_max = labels[tr].min(axis=0), labels[tr].max(axis=0)
    span = np.where(x_max > x_min, x_max - x_min, 1.0)
    x_max = x_min + span
    x = ((labels - x_min) / span - 0.5).astype(np.float32)
    dev = resolve_device(device)

    def t(a, idx):
        return torch.as_tensor(np.ascontiguousarray(a[idx], dtype=np.float32), device=dev)

    xt, ft, wt = t(x, tr), t(filled, tr), t(w, tr)
    xv, fv, wv = t(x, va), t(filled, va), t(w, va)

    def chi2(net, xb, fb, wb):
        return (wb * (net(xb) - fb) ** 2).sum() / (wb > 0).sum().clamp(min=1)

    t0, c0 = time.perf_counter(), time.process_time()
    hist = {"train_loss": [], "val_loss": [], "loss_name": "chi2 per pixel"}
    with seeded(seed, dev):
        net = _build_mlp(len(label_names), list(hidden), n_pix, negative_slope,
                         activation=activation).to(dev)
        with torch.no_grad():  # start at the mean spectrum
            net[-1].bias.copy_(torch.as_tensor(filled[tr].mean(axis=0)))
        opt = torch.optim.Adam(net.parameters(), lr=learning_rate)
        steps = (len(tr) + batch_size - 1) // batch_size
        if schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=learning_rate,
                                                        total_steps=epochs * steps)
        elif schedule == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5,
                                                               patience=max(patience // 3, 1))
        else:
            raise ValueError(f"schedule must be 'plateau' or 'onecycle', got {schedule!r}")
        gen = torch.Generator().manual_seed(seed)
        best, best_state, best_epoch, wait = np.inf, None, -1, 0
        bar = _progress(range(epochs), total=epochs, desc="emulator", unit="epoch",
                        disable=None if progress is None else not progress)
        for epoch in bar:
            net.train()
            perm = torch.randperm(len(tr), generator=gen).to(dev)
            total = 0.0
            for start in range(0, len(tr), batch_size):
                b = perm[start:start + batch_size]
                loss = chi2(net, xt[b], ft[b], wt[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if schedule == "onecycle":
                    sched.step()
                total += float(loss.detach()) * len(b)
            with torch.no_grad():
                val = float(chi2(net, xv, fv, wv))
            hist["train_loss"].append(total / len(tr))
            hist["val_loss"].append(val)
            if schedule == "plateau":
                sched.step(val)
            bar.set_postfix(train=f"{hist['train_loss'][-1]:.3g}", val=f"{val:.3g}")
            if val < best * (1.0 - min_delta):
                best, best_epoch, wait = val, epoch, 0
                best_state = copy.deepcopy(net.state_dict())
            else:
                wait += 1
                if wait >= patience and schedule == "plateau":
                    break
        bar.close()
        net.load_state_dict(best_state)
    net.eval()
    emu = PayneEmulator.from_torch(net.cpu(), label_names, x_min, x_max,
                                   training_labels=labels[tr], grid=grid,
                                   extrapolate=extrapolate)
    emu.s2 = held_out_s2(emu, filled[va], ivar[va], good[va], labels[va])
    emu.pixel_flags = (good[tr].sum(axis=0) == 0).astype(np.uint8)
    hist.update(best_epoch=best_epoch, train_time=time.perf_counter() - t0,
                    train_cpu_time=time.process_time() - c0,
                n_epochs=len(hist["train_loss"]), val_index=va)
    emu.history = hist
    return emu
