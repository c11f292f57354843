"""The Data-Driven Payne: The Payne's MLP on observed spectra, its gradients tied to a model's.

A network trained on survey spectra with reference labels from another survey
learns whatever in the spectrum predicts a label in *that* training set,
including astrophysical correlations: if [Fe/H] and [alpha/Fe] go together, the
[Fe/H] gradient spectrum picks up alpha lines, and stars off the training
set's correlations (or outside its label range) come out wrong. Xiang et al.
(2019) add to the loss a prior tying the network's gradient spectra
``d flux / d label`` to those of an ab initio model at reference labels: where
the model has a line of a label the data-driven gradient should look like the
model's, where it has none it should be ~0. The data decide the spectra (no
model-vs-data mismatch in the flux itself), the model decides *which* pixels
answer to which label.

Here the loss is

    mean chi^2 per unmasked pixel of the training spectra
    + strength * mean_l [ mean_{r,p} (J_rpl - G_rpl)^2 / mean_{r,p} G_rpl^2 ]

with ``J`` the network's gradient spectra and ``G`` the template's at the
template's reference labels ``r`` (both in the network's scaled labels, so the
prior is the relative squared error of each label's gradient spectra: labels
of different units weigh alike). The template is an input
(:class:`GradientTemplate`: a file, or built from any forward model), never a
model the package ships. The prior's reference labels may reach beyond the
training stars (e.g. to metal-poor stars the reference survey has few of): the
network's gradients are then constrained there, and its box is the union of
both ranges.

The result is a :class:`DataDrivenPayne`, a :class:`PayneEmulator` (same
numpy forward model, ``fit_spectra`` and ``nn.fast_fit.fit_emulator``,
grid check, training box) whose file also records how the prior was set.

References
----------
Xiang, M., Ting, Y.-S., Rix, H.-W. et al. 2019, ApJS 245, 34 (the Data-Driven Payne).
Ting, Y.-S., Conroy, C., Rix, H.-W. & Cargile, P. 2019, ApJ 879, 69 (The Payne).
"""
from __future__ import annotations

import copy
import json
import os
import time

import numpy as np

from .._util import atomic_path
from .._util import progress as _progress
from ._files import grid_arrays, grid_from_npz, open_npz
from .emulator import ACTIVATIONS, PayneEmulator, _build_mlp, held_out_s2, training_arrays

__all__ = ["GradientTemplate", "DataDrivenPayne", "train_dd_payne"]

_TEMPLATE_FORMAT = "cannon_fast.GradientTemplate"
_TEMPLATE_VERSION = 1


class GradientTemplate:
    """Gradient spectra ``d flux / d label`` of a reference model at reference labels.

    Parameters
    ----------
    labels : array_like, (R, L)
        Reference label sets.
    gradients : array_like, (R, P, L)
        ``d flux_p / d label_l`` at each reference label set, per physical unit of the label.
    label_names : sequence of str
    grid : PixelGrid, optional
        The pixels; spectra or networks of another grid are refused.
    source : str
        What the gradients came from (kept in files).
    """

    def __init__(self, labels, gradients, label_names, grid=None, source=""):
        self.labels = np.atleast_2d(np.asarray(labels, np.float64))
        self.gradients = np.asarray(gradients, np.float32)
        self.label_names = tuple(str(n) for n in label_names)
        r, l = self.labels.shape
        if l != len(self.label_names):
            raise ValueError(f"{l} label columns for {len(self.label_names)} label names")
        if self.gradients.ndim != 3 or self.gradients.shape[0] != r or \
                self.gradients.shape[2] != l:
            raise ValueError(f"gradients must be ({r}, P, {l}), got {self.gradients.shape}")
        if not (np.all(np.isfinite(self.labels)) and np.all(np.isfinite(self.gradients))):
            raise ValueError("the template's labels and gradients must be finite")
        if grid is not None and grid.n_pixels != self.n_pixels:
            raise ValueError(f"the grid {grid!r} has {grid.n_pixels} pixels, the gradients "
                             f"{self.n_pixels}")
        self.grid = grid
        self.source = str(source)

    @property
    def n_pixels(self):
        """P."""
        return self.gradients.shape[1]

    @property
    def n_points(self):
        """R, the reference label sets."""
        return self.labels.shape[0]

    def __repr__(self):
        return (f"<GradientTemplate {self.n_points} label sets x {self.n_pixels} pixels x "
                f"{', '.join(self.label_names)}{'; ' + self.source if self.source else ''}>")

    @classmethod
    def from_model(cls, model, labels, grid=None, source=None, batch_size=64, label_names=None):
        """Differentiate a forward model at reference labels.

        Parameters
        ----------
        model : forward model or callable
            ``predict_with_jacobian(labels (N, L))`` (e.g. an ab initio grid on the
            instrument's pixels, an emulator of one), or ``labels (L,) -> flux (P,)``
            (central differences).
        labels : array_like, (R, L)
        grid : PixelGrid, optional
            Default ``model.grid``.
        source : str, optional
            Default: the model's class name.
        batch_size : int
        label_names : sequence of str, optional
            Default ``model.label_names`` (needed for a plain callable).
        """
        from ..core.information import model_jacobian

        labels = np.atleast_2d(np.asarray(labels, np.float64))
        if hasattr(model, "predict_with_jacobian"):
            jac = np.concatenate([np.asarray(model.predict_with_jacobian(
                labels[i:i + batch_size])[1], np.float32)
                for i in range(0, len(labels), batch_size)])
        else:
            jac = np.stack([model_jacobian(model, lab)[1] for lab in labels]).astype(np.float32)
        names = label_names if label_names is not None else getattr(model, "label_names", None)
        if names is None:
            raise ValueError("give label_names: the model has no label_names attribute")
        return cls(labels, jac, names,
                   grid=grid if grid is not None else getattr(model, "grid", None),
                   source=source or type(model).__name__)

    def masked(self, threshold):
        """A copy with each gradient set to 0 where its label has no line.

        "No line": ``|G| < threshold x`` the label's 99th percentile of ``|G|`` over
        all pixels and reference labels; the prior then pulls the network's gradient
        there to zero rather than to the model's small (and least trustworthy) values.
        """
        g = self.gradients.copy()
        scale = np.percentile(np.abs(g).reshape(-1, g.shape[2]), 99, axis=0)  # (L,)
        g[np.abs(g) < threshold * scale] = 0.0
        return GradientTemplate(self.labels, g, self.label_names, self.grid,
                                f"{self.source} (masked below {threshold:g} x p99)")

    def for_labels(self, label_names):
        """The template with its labels in the order of ``label_names`` (all must be present)."""
        missing = [n for n in label_names if n not in self.label_names]
        if missing:
            raise ValueError(f"the gradient template has no {', '.join(missing)} (it has "
                             f"{', '.join(self.label_names)})")
        idx = [self.label_names.index(n) for n in label_names]
        return GradientTemplate(self.labels[:, idx], self.gradients[:, :, idx], label_names,
                                self.grid, self.source)

    def check_grid(self, grid, what="the spectra"):
        """Refuse another pixel grid (ValueError naming both)."""
        if grid is not None and self.grid is not None and grid != self.grid:
            raise ValueError(f"the gradient template is on the grid {self.grid!r}; {what} are "
                             f"on {grid!r}")

    def write(self, path):
        """Write an ``.npz`` (no pickle; atomic)."""
        arrays = {"format": np.array(_TEMPLATE_FORMAT),
                  "format_version": np.array(_TEMPLATE_VERSION),
                  "label_names": np.array(self.label_names, dtype=str),
                  "labels": self.labels, "gradients": self.gradients,
                  "source": np.array(self.source)}
        arrays.update(grid_arrays(self.grid))
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    @classmethod
    def read(cls, path, grid=None):
        """Read a template written by :meth:`write`; refuse one of another grid than ``grid``."""
        path = os.fspath(path)
        with open_npz(path, _TEMPLATE_FORMAT, _TEMPLATE_VERSION, "GradientTemplate") as data:
            out = cls(data["labels"], data["gradients"], [str(s) for s in data["label_names"]],
                      grid=grid_from_npz(data), source=str(data["source"]))
        out.check_grid(grid, what=f"the spectra to use {path} with")
        return out


class DataDrivenPayne(PayneEmulator):
    """A Payne MLP trained on observed spectra under a gradient prior (see the module).

    Everything a :class:`PayneEmulator` is, plus ``prior``: a dict of how it was
    trained (``strength``, the template's ``source``, ``n_points`` and label range
    ``template_box``, the training stars' ``data_box``), kept in its file.
    """

    prior = None

    def gradient_spectra(self, labels):
        """``d flux / d label`` (N, P, L) at the labels (the Jacobian, named as in the paper)."""
        return self.predict_with_jacobian(labels)[1]

    def gradient_mismatch(self, template):
        """Each label's relative rms difference between this network's and a template's gradients.

        ``sqrt(mean (J - G)^2 / mean G^2)`` over the template's reference labels and
        pixels (0: the template's gradients exactly, 1: as far off as no gradient at all).
        """
        template = template.for_labels(self.label_names)
        template.check_grid(self.grid, what="this network's spectra")
        jac = self.gradient_spectra(template.labels)
        g = template.gradients.astype(np.float64)
        return np.sqrt(((jac - g) ** 2).mean(axis=(0, 1)) /
                       np.maximum((g ** 2).mean(axis=(0, 1)), 1e-300))

    def _extra_arrays(self):
        return {"dd_payne_prior": np.array(json.dumps(self.prior or {}))}

    def _read_extra(self, data, path):
        if "dd_payne_prior" not in data.files:
            raise ValueError(f"{path} is a Payne emulator without a Data-Driven Payne record; "
                             "read it with PayneEmulator.read")
        self.prior = json.loads(str(data["dd_payne_prior"]))


def _torch_gradients(net, x, activation, slope):
    """The network's ``d out / d x`` (R, P, L), differentiable (forward mode through the layers)."""
    import torch

    mods = list(net)
    a, g = x, None
    for lin in mods[:-1:2]:
        h = lin(a)
        g = (lin.weight.unsqueeze(0).expand(x.shape[0], -1, -1) if g is None
             else torch.matmul(lin.weight, g))  # (R, H, L)
        if activation == "silu":
            s = torch.sigmoid(h)
            d = s * (1 + h * (1 - s))
            a = h * s
        elif activation == "tanh":
            a = torch.tanh(h)
            d = 1 - a ** 2
        else:
            d = torch.where(h > 0, torch.ones_like(h), torch.full_like(h, slope))
            a = torch.where(h > 0, h, slope * h)
        g = d.unsqueeze(-1) * g
    return torch.matmul(mods[-1].weight, g)  # (R, P, L)


def _box(labels, template, box):
    """The scaling box: given, or the training labels' range joined with the template's."""
    if box is not None:
        return np.asarray(box, np.float64).reshape(labels.shape[1], 2).T
    lo, hi = labels.min(axis=0), labels.max(axis=0)
    if template is not None:
        lo, hi = np.minimum(lo, template.labels.min(axis=0)), \
            np.maximum(hi, template.labels.max(axis=0))
    return lo, hi


def train_dd_payne(flux, ivar, labels, label_names, template=None, *, strength=100.0,
                   hidden=(300, 300), activation="silu", epochs=150, batch_size=128,
                   prior_batch=32, learning_rate=3e-3, validation_fraction=0.2,
                   sigma_floor=0.0, box=None, extrapolate=0.0, grid=None, seed=0,
                   device="auto", progress=None):
    """Train a Data-Driven Payne (with ``template``) or the same network without the prior.

    Parameters
    ----------
    flux, ivar : array_like, (N, P)
        Normalized training spectra; ``ivar == 0`` masks a pixel.
    labels : array_like, (N, L)
        Their reference labels (e.g. a high-resolution survey's), complete.
    label_names : sequence of str
    template : GradientTemplate, optional
        Gradient spectra of a model at reference labels (its labels are matched by
        name). ``None`` or ``strength=0``: no prior (the plain data-driven network).
    strength : float
        Weight of the prior against the data's mean chi^2 per pixel (see the module:
        the prior is a relative squared error of the gradient spectra). The more the
        template is like the data, the higher it pays to set it (measured values in
        docs/measurements.md).
    hidden, activation
        The network (smooth activations: gradients are what the prior constrains).
    epochs, batch_size, learning_rate
        Adam with a one-cycle learning rate; the epoch of lowest validation chi^2 is kept.
    prior_batch : int
        Reference label sets per step.
    validation_fraction : float
        Held-out stars (early-epoch choice and the per-pixel model variance ``s2``).
    sigma_floor : float
        Noise floor added in quadrature to the training spectra.
    box : array_like, (L, 2), optional
        The network's label box (default: the training labels' and the template's
        ranges joined). Fits stay inside it widened by ``extrapolate``.
    grid : PixelGrid, optional
        The spectra's pixels (checked against the template's, kept in the file).
    seed, device, progress

    Returns
    -------
    DataDrivenPayne
        ``history`` has ``train_loss``, ``val_chi2``, ``prior_loss``, ``best_epoch``,
        ``train_time``, ``train_cpu_time``, ``val_index``.
    """
    import torch

    from ._common import resolve_device, seeded

    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    filled, good, ivar, labels, label_names = training_arrays(flux, ivar, labels, label_names,
                                                              "the Data-Driven Payne")
    n, n_pix = filled.shape
    if template is not None and strength > 0:
        template = template.for_labels(label_names)
        if template.n_pixels != n_pix:
            raise ValueError(f"the gradient template has {template.n_pixels} pixels, the "
                             f"spectra {n_pix}")
        template.check_grid(grid)
        grid = grid if grid is not None else template.grid
    else:
        template, strength = None, 0.0
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(validation_fraction * n)))
    va, tr = np.sort(order[:n_val]), np.sort(order[n_val:])
    if len(tr) < 2:
        raise ValueError(f"too few stars ({n}) to train a network")
    x_min, x_max = _box(labels[tr], template, box)
    span = np.where(x_max > x_min, x_max - x_min, 1.0)
    x_max = x_min + span
    dev = resolve_device(device)

    def t(a):
        return torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32), device=dev)

    x = (labels - x_min) / span - 0.5
    w = ivar / (1.0 + ivar * sigma_floor ** 2)
    xt, ft, wt = t(x[tr]), t(filled[tr]), t(w[tr])
    xv, fv, wv = t(x[va]), t(filled[va]), t(w[va])
    if template is not None:
        xr = t((template.labels - x_min) / span - 0.5)
        gr = t(template.gradients * span[None, None, :])  # per scaled label, like the network's
        norm = (gr ** 2).mean(dim=(0, 1)).clamp(min=1e-30)  # (L,)

    def chi2(net, xb, fb, wb):
        return (wb * (net(xb) - fb) ** 2).sum() / (wb > 0).sum().clamp(min=1)

    def prior(net, idx):
        jac = _torch_gradients(net, xr[idx], activation, 0.01)
        return (((jac - gr[idx]) ** 2).mean(dim=(0, 1)) / norm).mean()

    t0, c0 = time.perf_counter(), time.process_time()
    hist = {"train_loss": [], "val_chi2": [], "prior_loss": []}
    with seeded(seed, dev):
        net = _build_mlp(len(label_names), list(hidden), n_pix, 0.01,
                         activation=activation).to(dev)
        with torch.no_grad():  # start at the mean spectrum
            net[-1].bias.copy_(torch.as_tensor(filled[tr].mean(axis=0)))
        opt = torch.optim.Adam(net.parameters(), lr=learning_rate)
        steps = (len(tr) + batch_size - 1) // batch_size
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=learning_rate,
                                                    total_steps=epochs * steps)
        gen = torch.Generator().manual_seed(seed)
        best, best_state, best_epoch = np.inf, None, -1
        bar = _progress(range(epochs), total=epochs, desc="DD-Payne", unit="epoch",
                        disable=None if progress is None else not progress)
        for epoch in bar:
            net.train()
            perm = torch.randperm(len(tr), generator=gen).to(dev)
            total = total_prior = 0.0
            for start in range(0, len(tr), batch_size):
                b = perm[start:start + batch_size]
                loss = chi2(net, xt[b], ft[b], wt[b])
                if template is not None:
                    pr = prior(net, torch.randint(template.n_points, (prior_batch,),
                                                  generator=gen).to(dev))
                    loss = loss + strength * pr
                    total_prior += float(pr.detach()) * len(b)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(b)
            with torch.no_grad():
                val = float(chi2(net, xv, fv, wv))
            hist["train_loss"].append(total / len(tr))
            hist["prior_loss"].append(total_prior / len(tr))
            hist["val_chi2"].append(val)
            bar.set_postfix(val=f"{val:.3g}", prior=f"{hist['prior_loss'][-1]:.3g}")
            if val <= best:  # the same choice with and without the prior
                best, best_epoch = val, epoch
                best_state = copy.deepcopy(net.state_dict())
        bar.close()
        net.load_state_dict(best_state)
    net.eval()
    emu = DataDrivenPayne.from_torch(net.cpu(), label_names, x_min, x_max,
                                     training_labels=labels[tr], grid=grid,
                                     extrapolate=extrapolate)
    emu.s2 = held_out_s2(emu, filled[va], ivar[va], good[va], labels[va])
    emu.pixel_flags = (good[tr].sum(axis=0) == 0).astype(np.uint8)
    emu.prior = {
        "strength": float(strength),
        "source": template.source if template is not None else None,
        "n_points": template.n_points if template is not None else 0,
        "template_box": (None if template is None else np.column_stack(
            [template.labels.min(0), template.labels.max(0)]).tolist()),
        "data_box": np.column_stack([labels[tr].min(0), labels[tr].max(0)]).tolist(),
        "n_train": int(len(tr)), "epochs": int(epochs)}
    hist.update(best_epoch=best_epoch, train_time=time.perf_counter() - t0,
                train_cpu_time=time.process_time() - c0, val_index=va)
    emu.history = hist
    return emu
