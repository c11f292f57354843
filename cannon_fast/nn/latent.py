"""A latent space shared by two instruments' spectra of the same stars (the JWST project's goal).

Each instrument has an encoder (spectrum -> latent vector) and a decoder (latent vector
-> spectrum); one label head reads labels (mean and log-variance) from the latent. On
stars observed by both, training asks that

* the labels decode from either instrument's latent (masked Gaussian NLL, as the
  regressor's),
* each instrument's spectrum decodes from either latent (chi² in units of the noise:
  the cross terms are what make one instrument's spectrum from the other's latent),
* the two latents of a star agree (their squared distance).

So a star seen by one instrument only gets labels and the other instrument's spectrum.

References
----------
Leung, H. W. & Bovy, J. 2019 (the heteroscedastic label loss); the cross-instrument
autoencoder idea as in the JWST project (seed 001) and O'Briain et al. 2021 (Cycle-StarNet).
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch

from .._util import progress as _progress
from ._common import prepare_labels, prepare_spectra, resolve_device, seeded, split_indices
from .regressor import masked_gaussian_nll

__all__ = ["SharedLatent"]

_LOGVAR_MIN, _LOGVAR_MAX = -14.0, 6.0


def _mlp(sizes, last_relu=False):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2 or last_relu:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


class _Nets(torch.nn.Module):
    def __init__(self, n_pixels, n_labels, latent_dim, hidden):
        super().__init__()
        h = list(hidden)
        self.enc = torch.nn.ModuleList([_mlp([p] + h + [latent_dim]) for p in n_pixels])
        self.dec = torch.nn.ModuleList([_mlp([latent_dim] + h[::-1] + [p]) for p in n_pixels])
        self.head = _mlp([latent_dim, h[-1], 2 * n_labels])
        self.n_labels = n_labels
        for i, p in enumerate(n_pixels):
            self.register_buffer(f"mean{i}", torch.ones(p))
            self.register_buffer(f"scale{i}", torch.ones(()))

    def standardize(self, i, flux, good):
        return (flux - getattr(self, f"mean{i}")) / getattr(self, f"scale{i}") * good

    def encode(self, i, flux, good):
        return self.enc[i](self.standardize(i, flux, good))

    def decode(self, i, z):
        """Flux (not standardized) of instrument i from latent z."""
        return self.dec[i](z) * getattr(self, f"scale{i}") + getattr(self, f"mean{i}")

    def labels(self, z):
        out = self.head(z)
        return out[:, :self.n_labels], out[:, self.n_labels:].clamp(_LOGVAR_MIN, _LOGVAR_MAX)


class SharedLatent:
    """Encoders and decoders of two instruments around one latent space, and a label head.

    Parameters
    ----------
    label_names : sequence of str
    instruments : (str, str)
        Names of the two instruments (e.g. ``("APOGEE", "JWST")``), used to say
        which spectra are which.
    latent_dim : int
    hidden : sequence of int
        Widths of the encoders' hidden layers (the decoders mirror them).
    seed : int
    device : str

    Attributes
    ----------
    history : dict
        ``train_loss``, ``val_loss`` per epoch and the parts of the validation loss
        (``val_label``, ``val_recon``, ``val_align``), ``best_epoch``, ``train_time``.
    split : dict
        ``train``, ``val``, ``test`` indices into the training arrays.
    """

    def __init__(self, label_names, instruments=("APOGEE", "JWST"), *, latent_dim=16,
                 hidden=(256,), seed=0, device="auto"):
        self.label_names = tuple(str(n) for n in label_names)
        self.instruments = tuple(str(n) for n in instruments)
        if len(self.instruments) != 2:
            raise ValueError(f"two instruments, got {self.instruments}")
        self.latent_dim = int(latent_dim)
        self.hidden = tuple(int(h) for h in np.atleast_1d(hidden))
        if self.latent_dim < 1 or not self.hidden or min(self.hidden) < 1:
            raise ValueError("latent_dim and every hidden width must be positive")
        self.seed = int(seed)
        self.device = resolve_device(device)
        self.net = None
        self.history, self.split = {}, {}
        self.label_offsets = self.label_scales = None
        self.n_pixels = None

    def _index(self, instrument):
        if instrument in (0, 1):
            return int(instrument)
        try:
            return self.instruments.index(instrument)
        except ValueError:
            raise ValueError(f"unknown instrument {instrument!r}; this model knows "
                             f"{self.instruments}") from None

    def _check_trained(self):
        if self.net is None:
            raise RuntimeError("the model is not trained: call train()")

    # ------------------------------------------------------------------ training
    def train(self, flux_a, ivar_a, flux_b, ivar_b, labels, *, split=(5, 1, 2), epochs=100,
              batch_size=64, learning_rate=1e-3, patience=10, min_delta=1e-4,
              weights=(1.0, 1.0, 1.0), progress=None):
        """Train on stars observed by both instruments (rows are the same stars).

        Parameters
        ----------
        flux_a, ivar_a : array_like, (N, P_a)
            Normalized spectra of the first instrument (``ivar = 0`` masks).
        flux_b, ivar_b : array_like, (N, P_b)
            The second instrument's spectra of the same N stars.
        labels : array_like, (N, L)
            NaN where missing.
        split : (float, float, float)
            Train : validation : test ratio, seeded.
        epochs, batch_size, learning_rate : int, int, float
        patience, min_delta : int, float
            Early stopping on the validation loss.
        weights : (float, float, float)
            Weights of the label, reconstruction and alignment losses.
        progress : bool, optional

        Returns
        -------
        self
        """
        xa, ga = prepare_spectra(flux_a, ivar_a, name="flux_a")
        xb, gb = prepare_spectra(flux_b, ivar_b, name="flux_b")
        y = prepare_labels(labels, len(self.label_names))
        n = xa.shape[0]
        if xb.shape[0] != n or y.shape[0] != n:
            raise ValueError(f"{self.instruments[0]} has {n} spectra, {self.instruments[1]} "
                             f"{xb.shape[0]}, labels {y.shape[0]}: give the same stars, "
                             "in the same order (cross-match them first)")
        wa = self._noise_weights(ivar_a, ga)
        wb = self._noise_weights(ivar_b, gb)
        tr, va, te = split_indices(n, split, self.seed)
        self.split = {"train": tr, "val": va, "test": te}
        self.label_offsets = np.nanmean(y[tr], 0)
        self.label_scales = np.where(np.nanstd(y[tr], 0) > 0, np.nanstd(y[tr], 0), 1.0)
        ys = ((y - self.label_offsets) / self.label_scales).astype(np.float32)
        self.n_pixels = (xa.shape[1], xb.shape[1])
        dev = self.device
        t0 = time.perf_counter()

        def tensors(idx):
            return [torch.as_tensor(a[idx], device=dev)
                    for a in (xa, ga.astype(np.float32), wa, xb, gb.astype(np.float32), wb, ys)]

        with seeded(self.seed, dev):
            net = _Nets(self.n_pixels, len(self.label_names), self.latent_dim,
                        self.hidden).to(dev)
            for i, (x, g) in enumerate(((xa, ga), (xb, gb))):
                mean = (x[tr] * g[tr]).sum(0) / np.maximum(g[tr].sum(0), 1)
                scale = float(np.sqrt((((x[tr] - mean) * g[tr]) ** 2).sum()
                                      / max(g[tr].sum(), 1))) or 1.0
                getattr(net, f"mean{i}").copy_(torch.as_tensor(mean, dtype=torch.float32))
                getattr(net, f"scale{i}").fill_(scale)
            self.net = net
            train_t, val_t = tensors(tr), tensors(va)
            opt = torch.optim.Adam(net.parameters(), lr=learning_rate)
            hist = {k: [] for k in ("train_loss", "val_loss", "val_label", "val_recon",
                                    "val_align")}
            best, best_state, best_epoch, wait = np.inf, None, -1, 0
            gen = torch.Generator().manual_seed(self.seed)
            bar = _progress(range(epochs), total=epochs, desc="latent", unit="epoch",
                            disable=None if progress is None else not progress)
            for epoch in bar:
                net.train()
                order = torch.randperm(len(tr), generator=gen).to(dev)
                total = 0.0
                for start in range(0, len(tr), batch_size):
                    b = order[start:start + batch_size]
                    parts = self._loss_parts(net, [t[b] for t in train_t])
                    loss = sum(w * p for w, p in zip(weights, parts))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(b)
                net.eval()
                with torch.no_grad():
                    parts = [float(p) for p in self._loss_parts(net, val_t)]
                val = sum(w * p for w, p in zip(weights, parts))
                hist["train_loss"].append(total / len(tr))
                hist["val_loss"].append(val)
                for k, p in zip(("val_label", "val_recon", "val_align"), parts):
                    hist[k].append(p)
                bar.set_postfix(val=f"{val:.3f}")
                if val < best - min_delta:
                    best, best_epoch, wait = val, epoch, 0
                    best_state = copy.deepcopy(net.state_dict())
                else:
                    wait += 1
                    if wait >= patience:
                        break
            bar.close()
            if best_state is not None:
                net.load_state_dict(best_state)
        net.eval()
        hist.update(best_epoch=best_epoch, train_time=time.perf_counter() - t0,
                    n_epochs=len(hist["train_loss"]))
        self.history = hist
        return self

    @staticmethod
    def _noise_weights(ivar, good):
        """Per-pixel 1/sigma² (0 where masked), for a chi² in units of the noise."""
        if ivar is None:
            return good.astype(np.float32)
        iv = np.atleast_2d(np.asarray(ivar, np.float64))
        return np.where(good, iv, 0.0).astype(np.float32)

    def _loss_parts(self, net, batch):
        """Label NLL (both latents), chi² per pixel (all four decodings), latent distance."""
        xa, ga, wa, xb, gb, wb, y = batch
        za, zb = net.encode(0, xa, ga), net.encode(1, xb, gb)
        label = 0.5 * sum(masked_gaussian_nll(*net.labels(z), y) for z in (za, zb))
        recon = 0.0
        for i, (x, w) in enumerate(((xa, wa), (xb, wb))):
            norm = (w > 0).sum().clamp(min=1)
            for z in (za, zb):
                recon = recon + ((net.decode(i, z) - x) ** 2 * w).sum() / norm / 4.0
        align = ((za - zb) ** 2).sum(1).mean()
        return label, recon, align

    # ------------------------------------------------------------------ use
    def _encode(self, flux, ivar, instrument):
        self._check_trained()
        i = self._index(instrument)
        x, g = prepare_spectra(flux, ivar, n_pixels=self.n_pixels[i])
        with torch.no_grad():
            return self.net.encode(i, torch.as_tensor(x, device=self.device),
                                   torch.as_tensor(g, dtype=torch.float32, device=self.device))

    def encode(self, flux, ivar, instrument):
        """Latent vectors (N, latent_dim) of one instrument's spectra."""
        return self._encode(flux, ivar, instrument).cpu().numpy()

    def predict_labels(self, flux, ivar, instrument):
        """Labels and their 1-sigma (predicted) errors from one instrument's spectra.

        Returns
        -------
        labels, errors : ndarray, (N, L)
        """
        z = self._encode(flux, ivar, instrument)
        with torch.no_grad():
            mu, logv = self.net.labels(z)
        lab = mu.double().cpu().numpy() * self.label_scales + self.label_offsets
        err = np.sqrt(np.exp(logv.double().cpu().numpy())) * self.label_scales
        return lab, err

    def generate(self, flux, ivar, source, target):
        """The ``target`` instrument's spectra of stars seen by ``source`` (via the latent).

        Returns
        -------
        ndarray, (N, P_target)
        """
        z = self._encode(flux, ivar, source)
        with torch.no_grad():
            return self.net.decode(self._index(target), z).double().cpu().numpy()
