"""TransformerPayne: labels -> flux at any wavelength, by attention from wavelength to labels.

Each label becomes a token (``x_j a_j + b_j``, learned vectors per label, then a
small MLP); each wavelength a query (sines and cosines of the wavelength at
log-spaced periods from ``min_period`` to twice the range, then an MLP). A few
blocks of cross-attention (the query attends to the label tokens) and MLP, with
residuals and layer norms, give the flux at that wavelength. The flux at one
wavelength does not depend on which other wavelengths are asked for, so the
model is queried at any wavelength inside the range it was trained on (not only
the training grid), and training can sample a few hundred wavelengths per
spectrum per step instead of all of them.

:class:`TransformerPayne` is a forward model (``predict``,
``predict_with_jacobian`` by central differences, ``label_names``,
``label_bounds``, ``training_labels``, ``s2``, ``outside_training``) for
:func:`cannon_fast.fit_spectra` and MCMC, and is written to ``.npz`` without
pickle, with its pixel grid.

References
----------
Różański, T., Ting, Y.-S. & Jabłońska, M. 2024, arXiv:2407.05751 (TransformerPayne).
Vaswani, A. et al. 2017, NeurIPS (attention).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from .._util import atomic_path
from .._util import progress as _progress
from ._calibrated import EmulatorFits
from ._files import grid_arrays, grid_from_npz, open_npz

__all__ = ["TransformerPayne", "train_transformer"]

_FORMAT = "cannon_fast.TransformerPayne"
_VERSION = 1


def _network(config):
    """The torch module for a config dict (built here so that reading needs no pickle)."""
    import torch
    from torch import nn

    class _Block(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.norm_q = nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
            self.norm_m = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, q, tokens):
            q = q + self.attn(self.norm_q(q), tokens, tokens, need_weights=False)[0]
            return q + self.mlp(self.norm_m(q))

    class _Net(nn.Module):
        def __init__(self, n_labels, d, heads, blocks, n_freq, wave_min, wave_max, min_period):
            super().__init__()
            self.label_scale = nn.Parameter(torch.randn(n_labels, d) / np.sqrt(d))
            self.label_shift = nn.Parameter(torch.randn(n_labels, d) / np.sqrt(d))
            self.token_mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            periods = np.geomspace(min_period, 2.0 * (wave_max - wave_min), n_freq)
            self.register_buffer("omega", torch.as_tensor(2 * np.pi / periods,
                                                          dtype=torch.float32))
            self.wave_min = float(wave_min)
            self.query_mlp = nn.Sequential(nn.Linear(2 * n_freq, 2 * d), nn.GELU(),
                                           nn.Linear(2 * d, d))
            self.blocks = nn.ModuleList([_Block(d, heads) for _ in range(blocks)])
            self.norm_out = nn.LayerNorm(d)
            self.out = nn.Linear(d, 1)

        def forward(self, x, wave):
            """Flux (B, Q) of scaled labels x (B, L) at wavelengths (Q,) or (B, Q), Angstrom."""
            tokens = x[:, :, None] * self.label_scale + self.label_shift  # (B, L, d)
            tokens = tokens + self.token_mlp(tokens)
            phase = (wave - self.wave_min)[..., None] * self.omega  # (..., Q, F)
            q = self.query_mlp(torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1))
            if q.dim() == 2:
                q = q.expand(x.shape[0], -1, -1)  # (B, Q, d)
            for blk in self.blocks:
                q = blk(q, tokens)
            return self.out(self.norm_out(q))[..., 0]

    c = config
    return _Net(c["n_labels"], c["d"], c["heads"], c["blocks"], c["n_freq"], c["wave_min"],
                c["wave_max"], c["min_period"])


class TransformerPayne(EmulatorFits):
    """A trained TransformerPayne as a forward model.

    Parameters
    ----------
    net : torch.nn.Module
        Built by ``_network(config)``.
    config : dict
        The network's shape and wavelength range.
    label_names : sequence of str
    x_min, x_max : array_like, (L,)
        The training box; labels are scaled to ``(label - x_min) / (x_max - x_min) - 0.5``.
    wavelength : array_like, (P,)
        The default wavelengths of ``predict`` (the training grid's).
    training_labels : array_like, (N, L), optional
    grid : PixelGrid, optional
    extrapolate : float
        Fit bounds: the box widened by this fraction (0: none).
    """

    def __init__(self, net, config, label_names, x_min, x_max, wavelength, training_labels=None,
                 grid=None, extrapolate=0.0):
        import torch

        self.net = net.double().eval()
        self.config = dict(config)
        self.label_names = [str(n) for n in label_names]
        self.x_min = np.asarray(x_min, np.float64)
        self.x_max = np.asarray(x_max, np.float64)
        span = self.x_max - self.x_min
        self.label_bounds = np.column_stack([self.x_min - extrapolate * span,
                                             self.x_max + extrapolate * span])
        self.wavelength = np.asarray(wavelength, np.float64)
        self.training_labels = (0.5 * (self.x_min + self.x_max))[None] if training_labels is None \
            else np.atleast_2d(np.asarray(training_labels, np.float64))
        self.grid = grid
        self.s2 = None
        self.train_info = {}  # its calibration (``calibrate``), as The Payne's
        self.error_model = None
        self.history = {}
        self._torch = torch
        self._step = 1e-4  # central-difference step, scaled labels

    @property
    def n_pixels(self):
        """P of the default wavelengths."""
        return self.wavelength.size

    def _x(self, labels):
        return (np.atleast_2d(np.asarray(labels, np.float64)) - self.x_min) / \
            (self.x_max - self.x_min) - 0.5

    def _run(self, x, wavelength, batch=64):
        torch = self._torch
        w = torch.as_tensor(np.array(wavelength, dtype=np.float64))  # a writable copy
        out = []
        with torch.no_grad():
            for i in range(0, len(x), batch):
                out.append(self.net(torch.as_tensor(x[i:i + batch]), w).numpy())
        return np.vstack(out) if out else np.zeros((0, w.numel()))

    def outside_training(self, labels):
        """(N,) bool: a label at or beyond the edge of the training box."""
        x = self._x(labels)
        return np.any((x <= -0.5 + 1e-6) | (x >= 0.5 - 1e-6), axis=1)

    def check_grid(self, grid, what="the spectra"):
        """Refuse spectra of another pixel grid (ValueError naming both)."""
        if grid is not None and self.grid is not None and grid != self.grid:
            raise ValueError(f"this emulator was trained on the grid {self.grid!r}; {what} are "
                             f"on {grid!r}: query it at their wavelengths with "
                             "predict(labels, wavelength=...) if they lie inside its range")

    def predict(self, labels, wavelength=None):
        """Flux at the labels (N, L) -> (N, P); at ``wavelength`` (any, Angstrom) if given."""
        labels = np.asarray(labels, np.float64)
        wave = self.wavelength if wavelength is None else np.asarray(wavelength, np.float64)
        lo, hi = self.config["wave_min"], self.config["wave_max"]
        if wave.min() < lo - 1e-6 or wave.max() > hi + 1e-6:
            raise ValueError(f"wavelengths {wave.min():.2f}-{wave.max():.2f} A reach outside "
                             f"the range the emulator was trained on, {lo:.2f}-{hi:.2f} A")
        out = self._run(self._x(labels), wave)
        return out[0] if labels.ndim == 1 else out

    def predict_with_jacobian(self, labels, wavelength=None):
        """Flux (N, P) and d flux / d label (N, P, L), central differences in scaled labels."""
        wave = self.wavelength if wavelength is None else wavelength
        x = self._x(labels)
        n, n_lab = x.shape
        e = np.eye(n_lab) * self._step
        pts = np.concatenate([x[:, None], x[:, None] + e, x[:, None] - e], axis=1)
        out = self._run(pts.reshape(-1, n_lab), wave).reshape(n, 2 * n_lab + 1, -1)
        jac = (out[:, 1:n_lab + 1] - out[:, n_lab + 1:]) / (2 * self._step)  # (N, L, P)
        jac = jac / (self.x_max - self.x_min)[None, :, None]
        return out[:, 0], np.swapaxes(jac, 1, 2)

    def write(self, path):
        """Write an ``.npz`` (arrays and JSON only, no pickle; atomic)."""
        arrays = {f"param:{k}": v.detach().cpu().numpy()
                  for k, v in self.net.state_dict().items()}
        meta = dict(config=self.config, label_names=self.label_names)
        arrays.update(format=np.array(_FORMAT), format_version=np.array(_VERSION),
                      meta=np.array(json.dumps(meta)), x_min=self.x_min, x_max=self.x_max,
                      wavelength=self.wavelength, training_labels=self.training_labels,
                      label_bounds=self.label_bounds)
        arrays.update(grid_arrays(self.grid))
        arrays.update(self._calibration_arrays())
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    @classmethod
    def read(cls, path, grid=None):
        """Read a file of :meth:`write`; with ``grid``, refuse one made for another grid."""
        import torch

        path = os.fspath(path)
        with open_npz(path, _FORMAT, _VERSION, "TransformerPayne") as data:
            meta = json.loads(str(data["meta"]))
            net = _network(meta["config"])
            state = {k[6:]: torch.as_tensor(data[k]) for k in data.files if k.startswith("param:")}
            net.load_state_dict(state)
            own_grid = grid_from_npz(data)
            emu = cls(net, meta["config"], meta["label_names"], data["x_min"], data["x_max"],
                      data["wavelength"], training_labels=data["training_labels"], grid=own_grid)
            emu.label_bounds = np.array(data["label_bounds"])
            emu._read_calibration(data)
        emu.check_grid(grid, what=f"the spectra to use {path} with")
        return emu


def _catmull_rom(f, cols, frac):
    """Cubic interpolation of rows ``f`` (B, P) at ``cols + frac`` (Q,), 1 <= cols < P - 2."""
    p0, p1, p2, p3 = f[:, cols - 1], f[:, cols], f[:, cols + 1], f[:, cols + 2]
    t = frac[None]
    return 0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                  + (3 * p1 - p0 - 3 * p2 + p3) * t ** 3)


def train_transformer(flux, labels, wavelength, label_names, *, box=None, grid=None, d=64,
                      heads=4, blocks=2, n_freq=48, min_period=None, steps=3000,
                      batch_spectra=32, batch_wavelengths=512, learning_rate=2e-3,
                      validation_fraction=0.1, eval_every=200, jitter=True, seed=0,
                      progress=None):
    """Train a TransformerPayne on spectra (e.g. of an ab initio model) at their labels.

    Each step takes ``batch_spectra`` spectra and ``batch_wavelengths`` random
    pixels of them (the same pixels for the batch); the loss is the mean
    squared error. The learning rate follows one cycle up to ``learning_rate``
    and down over ``steps``; the state with the lowest validation MAE (full
    held-out spectra, every ``eval_every`` steps) is kept.

    Parameters
    ----------
    flux : array_like, (N, P)
        Noise-free spectra.
    labels : array_like, (N, L)
    wavelength : array_like, (P,)
    label_names : sequence of str
    box : array_like, (L, 2), optional
        The training box (default: the labels' range).
    grid : PixelGrid, optional
    d, heads, blocks, n_freq : int
        Width, attention heads, blocks, wavelength frequencies.
    min_period : float, optional
        Shortest period of the wavelength encoding, Angstrom (default: 3 pixels).
    steps, batch_spectra, batch_wavelengths, learning_rate, validation_fraction, eval_every
    jitter : bool
        Train at random wavelengths between the pixels (flux by cubic
        interpolation of well-sampled spectra), so that the emulator is right
        between the training grid's wavelengths too.
    seed : int
    progress : bool, optional

    Returns
    -------
    TransformerPayne
        ``history``: ``val_mae`` per evaluation, ``best_step``, ``train_time``.
    """
    import torch

    from ._common import seeded

    flux = np.asarray(flux, np.float32)
    labels = np.asarray(labels, np.float64)
    wave = np.asarray(wavelength, np.float64)
    n, p = flux.shape
    if labels.shape != (n, len(label_names)) or wave.shape != (p,):
        raise ValueError(f"flux {flux.shape}, labels {labels.shape} and wavelength {wave.shape} "
                         "do not match")
    box = (np.column_stack([labels.min(0), labels.max(0)]) if box is None
           else np.asarray(box, np.float64))
    x = ((labels - box[:, 0]) / (box[:, 1] - box[:, 0]) - 0.5).astype(np.float32)
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(validation_fraction * n)))
    va, tr = order[:n_val], order[n_val:]
    config = dict(n_labels=len(label_names), d=int(d), heads=int(heads), blocks=int(blocks),
                  n_freq=int(n_freq), wave_min=float(wave[0]), wave_max=float(wave[-1]),
                  min_period=float(min_period if min_period is not None
                                   else 3 * np.median(np.diff(wave))))
    xt, ft = torch.as_tensor(x), torch.as_tensor(flux)
    wt = torch.as_tensor(np.array(wave, dtype=np.float32))
    hist = {"val_mae": [], "val_step": []}
    t0 = time.perf_counter()
    with seeded(seed, torch.device("cpu")):
        net = _network(config)
        with torch.no_grad():
            net.out.bias.fill_(float(flux[tr].mean()))
        opt = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-5)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=learning_rate, total_steps=steps)
        gen = torch.Generator().manual_seed(seed)
        tr_t = torch.as_tensor(tr)
        best, best_state, best_step = np.inf, None, -1
        for step in _progress(range(steps), total=steps, desc="TransformerPayne", unit="step",
                              disable=None if progress is None else not progress):
            net.train()
            rows = tr_t[torch.randint(len(tr), (batch_spectra,), generator=gen)]
            if jitter:
                # wavelengths between the pixels, the flux there by cubic (Catmull-Rom)
                # interpolation: trained only at the pixels, the encoding's shortest
                # periods would fit anything between them
                cols = torch.randint(1, p - 2, (batch_wavelengths,), generator=gen)
                frac = torch.rand(batch_wavelengths, generator=gen)
                wq = wt[cols] + frac * (wt[cols + 1] - wt[cols])
                target = _catmull_rom(ft[rows], cols, frac)
            else:
                cols = torch.randint(p, (batch_wavelengths,), generator=gen)
                wq, target = wt[cols], ft[rows][:, cols]
            pred = net(xt[rows], wq)
            loss = ((pred - target) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if (step + 1) % eval_every == 0 or step == steps - 1:
                net.eval()
                with torch.no_grad():
                    mae = float(np.mean([np.abs(net(xt[va[i:i + 16]], wt).numpy()
                                                - flux[va[i:i + 16]]).mean()
                                         for i in range(0, min(len(va), 64), 16)]))
                hist["val_mae"].append(mae)
                hist["val_step"].append(step + 1)
                if mae < best:
                    best, best_step = mae, step + 1
                    best_state = {k: v.clone() for k, v in net.state_dict().items()}
        net.load_state_dict(best_state)
    hist.update(best_step=best_step, train_time=time.perf_counter() - t0, val_index=va)
    emu = TransformerPayne(net, config, label_names, box[:, 0], box[:, 1], wave,
                           training_labels=labels[tr], grid=grid)
    emu.history = hist
    return emu
