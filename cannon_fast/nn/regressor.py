"""Spectrum -> labels: a StarNet-style CNN or an MLP with astroNN-style uncertainties.

References
----------
Fabbro, S. et al. 2018, MNRAS 475, 2978 (StarNet).
Leung, H. W. & Bovy, J. 2019, MNRAS 483, 3255 (astroNN: dropout variational
inference, heteroscedastic loss, missing labels).
Kendall, A. & Gal, Y. 2017, NeurIPS (aleatoric + epistemic uncertainty).
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .._util import progress as _progress
from ._common import (MISSING_VALUE, load_checkpoint, prepare_labels, prepare_spectra,
                      resolve_device, save_checkpoint, seeded, split_indices)

__all__ = ["SpectrumRegressor", "NNResult", "masked_gaussian_nll", "ARCHITECTURES", "PRECISIONS",
           "STARNET_TRAINING", "format_layer_summary"]

ARCHITECTURES = ("cnn", "mlp")
#: Arithmetic of the conv and dense layers: float32, or bfloat16 through torch.autocast
#: (weights, loss and optimizer stay float32; on CPUs with AVX-512 BF16 / AMX the
#: layers run ~1.6x faster: docs/measurements.md).
PRECISIONS = ("float32", "bfloat16")
#: Learning-rate schedules of :meth:`SpectrumRegressor.train`.
LR_SCHEDULES = ("plateau", "cosine")
#: Largest per-pixel noise sigma drawn (the noise augmentation's, and the noise of
#: synthetic spectra at a borrowed star's ivar): a nearly-zero ivar, which some files
#: give their bad pixels instead of 0, must not turn into noise that swamps the flux.
NOISE_SIGMA_CAP = 0.05
# Bounds on the predicted log-variance (standardized labels): keeps exp() finite early on.
_LOGVAR_MIN, _LOGVAR_MAX = -14.0, 6.0
#: Default "uncertain label" thresholds on the total 1-sigma error, after astroNN's
#: flags (Teff 300 K, log g 0.2 and, in ``predict``, 7.5 % of log g; [Fe/H] / [M/H]
#: use Astra's relative rule instead; other [X/H], [X/Fe] 0.12 dex absolute).
DEFAULT_UNCERTAIN = {"TEFF": 300.0, "LOGG": 0.2, "FE_H": 0.12, "M_H": 0.12}
#: StarNet's training as in the JWST project (seed 001, after Fabbro et al. 2018): batch 64,
#: learning rate 1e-3, at most 20 epochs, stop when the validation loss has not improved by
#: 1e-3 in 5 epochs. The architecture is the regressor's default (``arch="cnn"``).
STARNET_TRAINING = dict(epochs=20, batch_size=64, learning_rate=1e-3, patience=5,
                        min_delta=1e-3)


def masked_gaussian_nll(mean, log_var, target, label_var=None):
    """Heteroscedastic Gaussian negative log-likelihood that ignores missing labels.

    ``0.5 * (log v + (y - mu)^2 / v)`` with ``v = exp(log_var) + label_var``,
    averaged over the labels that are present (finite in ``target``); missing
    ones contribute neither to the loss nor to the gradient, so a star with
    some labels missing is kept rather than dropped (astroNN's masked loss).

    Parameters
    ----------
    mean, log_var : Tensor, (B, L)
        Predicted mean and log-variance (standardized labels).
    target : Tensor, (B, L)
        Standardized labels, NaN where missing.
    label_var : Tensor, (B, L), optional
        Known variance of the training labels (standardized), added to the
        predicted one so that the network learns the scatter beyond them.

    Returns
    -------
    Tensor, ()
    """
    present = torch.isfinite(target)
    y = torch.where(present, target, torch.zeros_like(target))
    var = torch.exp(log_var)
    if label_var is not None:
        var = var + torch.where(present, label_var, torch.zeros_like(label_var))
    nll = 0.5 * (torch.log(var) + (y - mean) ** 2 / var)
    nll = torch.where(present, nll, torch.zeros_like(nll))
    return nll.sum() / present.sum().clamp(min=1)


def _per_layer(value, n, name):
    """Broadcast an int to ``n`` layers or check a sequence of length ``n``."""
    if np.ndim(value) == 0:
        return [int(value)] * n
    value = [int(v) for v in value]
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries but there are {n} conv layers")
    return value


def _make_config(arch, n_pixels, n_labels, filters, kernel_size, stride, pool_size, hidden,
                 dropout):
    """Validate architecture arguments into a plain dict (what the checkpoint stores)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    hidden = [int(h) for h in np.atleast_1d(hidden)]
    if not hidden or min(hidden) < 1:
        raise ValueError(f"hidden must list at least one positive layer width, got {hidden}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    cfg = {"arch": arch, "n_pixels": int(n_pixels), "n_labels": int(n_labels),
           "hidden": hidden, "dropout": float(dropout)}
    if arch == "cnn":
        filters = [int(f) for f in np.atleast_1d(filters)]
        n = len(filters)
        cfg.update(filters=filters, kernel_size=_per_layer(kernel_size, n, "kernel_size"),
                   stride=_per_layer(stride, n, "stride"),
                   pool_size=_per_layer(pool_size, n, "pool_size"))
        length = cfg["n_pixels"]
        for k, s, p in zip(cfg["kernel_size"], cfg["stride"], cfg["pool_size"]):
            length = ((length - k) // s + 1) // max(p, 1)
            if length < 1:
                raise ValueError(f"the conv layers shrink {n_pixels} pixels to nothing; use "
                                 "smaller kernels, strides or pools")
        cfg["n_features"] = length * filters[-1]
    else:
        cfg["n_features"] = cfg["n_pixels"]
    return cfg


def _split(n, split, seed):
    """(train, val, test) rows: a seeded split by ratio, or given rows checked."""
    if not isinstance(split, dict):
        return split_indices(n, split, seed)
    unknown = set(split) - {"train", "val", "test"}
    if unknown or not {"train", "val"} <= set(split):
        raise ValueError(f"split as a dict needs 'train' and 'val' (and may have 'test'), got "
                         f"{sorted(split)}")
    parts = [np.asarray(split.get(k, []), np.int64).ravel() for k in ("train", "val", "test")]
    allp = np.concatenate(parts)
    if allp.size and (allp.min() < 0 or allp.max() >= n):
        raise ValueError(f"split has rows outside 0..{n - 1}")
    if np.unique(allp).size != allp.size:
        raise ValueError("split's train, val and test rows overlap or repeat")
    if not parts[0].size or not parts[1].size:
        raise ValueError("split's train and val parts must not be empty")
    return tuple(np.sort(p) for p in parts)


def _dropout_mask(shape, p, dtype, device):
    """Inverted-dropout multipliers: 0 with probability ``p``, else ``1 / (1 - p)``.

    Drawn as 16-bit integers, four per 64-bit random word: torch's ``bernoulli_``
    spends ~6 ns per value on the CPU, and with 30 MC samples of the head the masks
    cost a tenth of a prediction. ``p`` is resolved to 1/65536.
    """
    n = int(np.prod(shape))
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64,
                          device=device)
    keep = words.view(torch.int16)[:n] >= -32768 + round(p * 65536)
    return (keep.to(dtype) * (1.0 / (1.0 - p))).reshape(shape)


def _mc_head(head, z, sample):
    """``head(z)`` with its dropout layers sampled (``sample``) or off."""
    for layer in head:
        if isinstance(layer, torch.nn.Dropout):
            if sample and layer.p > 0:
                z = z * _dropout_mask(z.shape, layer.p, z.dtype, z.device)
        else:
            z = layer(z)
    return z


def _conv_max_pool(conv, x, pool):
    """``max_pool1d(conv(x), pool)`` as the maximum of ``pool`` convolutions of stride ``pool``.

    The same values, without the full-resolution output: offset ``k`` computes the
    positions ``k, k + pool, ...`` that the pool windows take their maximum over. In
    bfloat16 on the CPU ``max_pool1d`` costs more than the convolution before it, and
    the strided convolutions together cost about one full one.
    """
    stride, width = conv.stride[0], conv.kernel_size[0]
    n = ((x.shape[-1] - width) // stride + 1) // pool  # pooled length, as max_pool1d's
    step = stride * pool
    out = None
    for k in range(pool):
        start = stride * k
        part = torch.nn.functional.conv1d(x[..., start:start + step * (n - 1) + width],
                                          conv.weight, conv.bias, stride=step)
        out = part if out is None else torch.maximum(out, part)
    return out


class _Net(torch.nn.Module):
    """Trunk (conv layers + first dense layer, no dropout) and a dropout head.

    Dropout acts on every hidden dense layer's output; the trunk is
    deterministic, so MC-dropout samples re-run only the small head.
    """

    def __init__(self, cfg):
        super().__init__()
        self.n_labels = cfg["n_labels"]
        layers, c = [], 1
        if cfg["arch"] == "cnn":
            for f, k, s, p in zip(cfg["filters"], cfg["kernel_size"], cfg["stride"],
                                  cfg["pool_size"]):
                # max-pool before the ReLU: the two commute (ReLU is monotonic), and the
                # ReLU then touches p times fewer values (same outputs, same weights' keys)
                layers.append(torch.nn.Conv1d(c, f, k, stride=s))
                if p > 1:
                    layers.append(torch.nn.MaxPool1d(p))
                layers.append(torch.nn.ReLU())
                c = f
        self.conv = torch.nn.Sequential(*layers)
        self.is_cnn = cfg["arch"] == "cnn"
        hidden = cfg["hidden"]
        self.dense = torch.nn.Linear(cfg["n_features"], hidden[0])
        head = []
        for h_in, h_out in zip(hidden[:-1], hidden[1:]):
            head += [torch.nn.Dropout(cfg["dropout"]), torch.nn.Linear(h_in, h_out),
                     torch.nn.ReLU()]
        head += [torch.nn.Dropout(cfg["dropout"]), torch.nn.Linear(hidden[-1], 2 * self.n_labels)]
        self.head = torch.nn.Sequential(*head)
        # input standardization, saved with the weights
        self.register_buffer("pixel_mean", torch.zeros(cfg["n_pixels"]))
        self.register_buffer("pixel_scale", torch.ones(()))

    def trunk(self, flux, good):
        """Deterministic features (B, H1) of standardized spectra."""
        x = (flux - self.pixel_mean) / self.pixel_scale * good
        if self.is_cnn:
            x = self._convolve(x[:, None, :]).flatten(1)
        return torch.relu(self.dense(x))

    def _convolve(self, x):
        """The conv layers.

        At inference in bfloat16 a convolution followed by a max-pool runs as strided
        convolutions (:func:`_conv_max_pool`, the same values). Not when training: the
        backward pass of the strided form is slower than that of the plain one, and
        not in float32, where it gains nothing.
        """
        if torch.is_grad_enabled() or not (torch.is_autocast_enabled("cpu") and
                                           torch.get_autocast_dtype("cpu") == torch.bfloat16):
            return self.conv(x)
        layers = list(self.conv)
        i = 0
        while i < len(layers):
            layer = layers[i]
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(layer, torch.nn.Conv1d) and isinstance(nxt, torch.nn.MaxPool1d):
                x = _conv_max_pool(layer, x, nxt.kernel_size)
                i += 2
            else:
                x = layer(x)
                i += 1
        return x

    def split(self, out):
        """Split the head output into mean and clamped log-variance."""
        return out[..., :self.n_labels], out[..., self.n_labels:].clamp(_LOGVAR_MIN, _LOGVAR_MAX)

    def forward(self, flux, good):
        """Return the predicted mean and log-variance, each (B, L)."""
        return self.split(self.head(self.trunk(flux, good)))


@dataclass
class NNResult:
    """Labels predicted by :meth:`SpectrumRegressor.predict`, in physical units.

    Attributes
    ----------
    labels : ndarray, (N, L)
        Mean over the MC-dropout samples (NaN when ``NO_RESULT``).
    errors : ndarray, (N, L)
        Total 1-sigma: ``sqrt(model_errors**2 + predictive_errors**2)``.
    model_errors : ndarray, (N, L)
        Standard deviation over the MC-dropout samples (epistemic), times the
        regressor's ``error_scale``.
    predictive_errors : ndarray, (N, L)
        Square root of the mean predicted variance (aleatoric), times ``error_scale``.
    flags : ndarray, (N,) int
        Bit field, see ``FLAGS``.
    uncertain : ndarray, (N, L) bool
        The error of that label is above its threshold.
    bad_pixel_fraction : ndarray, (N,)
        Fraction of masked pixels of each input spectrum.
    label_names : tuple of str
    """

    labels: np.ndarray
    errors: np.ndarray
    model_errors: np.ndarray
    predictive_errors: np.ndarray
    flags: np.ndarray
    uncertain: np.ndarray
    bad_pixel_fraction: np.ndarray
    label_names: tuple = field(default_factory=tuple)

    #: Astra's AstroNN ``result_flags`` bits: ``UNCERTAIN_LOGG`` (0), ``UNCERTAIN_TEFF``
    #: (1), ``UNCERTAIN_FE_H`` (2, or [M/H] without FE_H), ``NO_RESULT`` (11: too many
    #: masked pixels, the spectrum was not used); and ours: ``UNCERTAIN_LABEL`` (3: another
    #: label is uncertain), ``OUT_OF_RANGE`` (4: a label outside the training range).
    #: Which errors make a label uncertain: :meth:`SpectrumRegressor.predict`.
    FLAGS = {"UNCERTAIN_LOGG": 1 << 0, "UNCERTAIN_TEFF": 1 << 1, "UNCERTAIN_FE_H": 1 << 2,
             "UNCERTAIN_LABEL": 1 << 3, "OUT_OF_RANGE": 1 << 4, "NO_RESULT": 1 << 11}

    def flag_names(self, i):
        """Names of the flags set for star ``i``."""
        return [k for k, v in self.FLAGS.items() if self.flags[i] & v]

    @property
    def warn(self):
        """(N,) bool: any flag set (astroNN's ``flag_warn``)."""
        return self.flags != 0

    @property
    def bad(self):
        """(N,) bool, astroNN's ``flag_bad``.

        ``NO_RESULT``, or Teff uncertain, or both log g and [Fe/H] (or [M/H])
        uncertain; with none of those labels, any uncertain label.
        """
        names = [n.upper() for n in self.label_names]
        bad = (self.flags & self.FLAGS["NO_RESULT"]) != 0
        col = {n: self.uncertain[:, names.index(n)] for n in names}
        feh = col.get("FE_H", col.get("M_H"))
        if "TEFF" in col or ("LOGG" in col and feh is not None):
            if "TEFF" in col:
                bad = bad | col["TEFF"]
            if "LOGG" in col and feh is not None:
                bad = bad | (col["LOGG"] & feh)
            return bad
        return bad | self.uncertain.any(axis=1)

    def to_table(self):
        """Return an astropy Table: one column per label, ``<name>_ERR``, flags."""
        from astropy.table import Table

        t = Table()
        for j, name in enumerate(self.label_names):
            t[name] = self.labels[:, j]
            t[name + "_ERR"] = self.errors[:, j]
            t[name + "_MODEL_ERR"] = self.model_errors[:, j]
        t["NN_FLAGS"] = self.flags
        t["NN_WARN"] = self.warn
        t["NN_BAD"] = self.bad
        t["BAD_PIXEL_FRACTION"] = self.bad_pixel_fraction
        return t

    def to_astra_table(self):
        """Return an astropy Table with astraAllStarAstroNN-like columns.

        Lower-case label names (``teff``, ``logg``, ``fe_h``, ...), ``e_<name>``
        for the total errors, ``result_flags`` (Astra's bits, :attr:`FLAGS`),
        ``flag_warn`` and ``flag_bad``.
        """
        from astropy.table import Table

        t = Table()
        for j, name in enumerate(self.label_names):
            t[name.lower()] = self.labels[:, j].astype(np.float32)
            t["e_" + name.lower()] = self.errors[:, j].astype(np.float32)
        t["result_flags"] = self.flags.astype(np.int32)
        t["flag_warn"] = self.warn
        t["flag_bad"] = self.bad
        return t


class SpectrumRegressor:
    """Normalized spectrum -> labels, with MC-dropout and predicted uncertainties.

    Parameters
    ----------
    label_names : sequence of str
        The L labels to predict (any number, any names).
    arch : {"cnn", "mlp"}
        StarNet-style 1-D CNN, or a plain MLP on the pixels.
    filters : sequence of int
        CNN: output channels of each conv layer (StarNet: 4, 16).
    kernel_size, stride, pool_size : int or sequence of int
        CNN: per conv layer (one value for all); ``pool_size`` 1 means no max-pool
        after that layer. StarNet pools once, after the last conv: ``(1, 4)``.
    hidden : sequence of int
        Widths of the dense layers (StarNet: 256, 128).
    dropout : float
        Dropout rate after each dense layer; also used at inference (MC dropout).
    device : str or torch.device
        ``"auto"``: CUDA if available, else CPU.
    seed : int
        Seeds the split, the initial weights, the batches and dropout.
    precision : {"float32", "bfloat16"}
        Arithmetic of the layers in training and prediction (:data:`PRECISIONS`); a
        run-time choice, not saved with the weights.

    Attributes
    ----------
    config : dict
        The architecture (set by :meth:`train` once the pixel count is known).
    history : dict
        ``train_loss``, ``val_loss``, ``lr`` per epoch, ``best_epoch``, ``train_time`` (wall)
        and ``train_cpu_time`` (seconds).
    split : dict
        ``train``, ``val``, ``test`` indices into the training arrays.
    label_offsets, label_scales : ndarray, (L,)
        Label standardization: ``x = (label - offset) / scale``.
    label_range : ndarray, (L, 2)
        Training labels' min and max.
    error_scale : ndarray, (L,)
        Factor on the predicted errors from the validation-set calibration.

    References
    ----------
    Fabbro et al. 2018; Leung & Bovy 2019.
    """

    def __init__(self, label_names, arch="cnn", *, filters=(4, 16), kernel_size=8, stride=1,
                 pool_size=(1, 4), hidden=(256, 128), dropout=0.1, device="auto", seed=0,
                 precision="float32"):
        self.label_names = tuple(str(n) for n in label_names)
        if not self.label_names:
            raise ValueError("label_names is empty")
        self._arch_args = dict(arch=arch, filters=filters, kernel_size=kernel_size,
                               stride=stride, pool_size=pool_size, hidden=hidden,
                               dropout=dropout)
        # validate now (with a nominal pixel count) so that mistakes surface early
        _make_config(n_pixels=10 ** 6, n_labels=len(self.label_names), **self._arch_args)
        self.device = resolve_device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.seed = int(seed)
        self.config = None
        self.net = None
        self.history = {}
        self.split = {}
        self.label_offsets = self.label_scales = self.label_range = None
        self.error_scale = np.ones(self.n_labels)

    # ------------------------------------------------------------------ properties
    @property
    def n_labels(self):
        """L."""
        return len(self.label_names)

    @property
    def n_pixels(self):
        """P the network was trained on (None before training)."""
        return None if self.config is None else self.config["n_pixels"]

    @property
    def n_parameters(self):
        """Number of trainable weights."""
        self._check_trained()
        return sum(p.numel() for p in self.net.parameters())

    def layer_summary(self, n_pixels=None):
        """Each layer's output shape and trainable parameters (torchsummary-like).

        Parameters
        ----------
        n_pixels : int, optional
            Spectrum length; default the trained network's. Works before
            training (a network of that size is built and run on one spectrum).

        Returns
        -------
        list of dict
            ``{"layer", "output_shape", "n_parameters"}`` in order, the output
            shape without the batch axis. The last dense layer has ``2 L``
            outputs: L means and L log-variances (the uncertainties).
        """
        if n_pixels is None:
            self._check_trained()
            cfg, net = self.config, self.net
        else:
            cfg = _make_config(n_pixels=int(n_pixels), n_labels=self.n_labels,
                               **self._arch_args)
            with seeded(self.seed, torch.device("cpu")):
                net = _Net(cfg)
        rows = []
        layers = list(net.conv) + [net.dense, torch.nn.ReLU()] + list(net.head)
        x = torch.ones(1, cfg["n_pixels"])
        was_training = net.training
        net.eval()
        with torch.no_grad():
            if net.is_cnn:
                x = x[:, None, :]
            for i, layer in enumerate(layers):
                if layer is net.dense and net.is_cnn:
                    rows.append(dict(layer="Flatten", output_shape=(int(x[0].numel()),),
                                     n_parameters=0))
                    x = x.flatten(1)
                x = layer(x)
                rows.append(dict(layer=type(layer).__name__, output_shape=tuple(x.shape[1:]),
                                 n_parameters=sum(p.numel() for p in layer.parameters())))
        net.train(was_training)
        return rows

    def _autocast(self):
        """The context the layers run in: bfloat16 autocast, or nothing."""
        if self.precision == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _check_trained(self):
        if self.net is None:
            raise RuntimeError("the network is not trained: call train() or load()")

    # ------------------------------------------------------------------ training
    def train(self, flux, labels, ivar=None, *, label_errors=None, split=(5, 1, 2),
              epochs=100, batch_size=64, learning_rate=1e-3, weight_decay=0.0, patience=10,
              min_delta=1e-4, lr_factor=0.5, lr_patience=4, missing_value=MISSING_VALUE,
              max_bad_fraction=0.3, calibrate=True, calibrate_on=None, augment_noise=0.0,
              ema_decay=0.99, lr_schedule="plateau", progress=None):
        """Train on normalized spectra with (possibly incomplete) labels.

        The stars are split (seeded) into train/validation/test by ``split``;
        the network with the lowest validation loss is kept (early stopping
        after ``patience`` epochs without an improvement of ``min_delta``), and
        the learning rate drops by ``lr_factor`` after ``lr_patience`` epochs
        on a plateau.

        Parameters
        ----------
        flux : array_like, (N, P)
            Continuum-normalized spectra.
        labels : array_like, (N, L)
            Training labels; NaN or ``missing_value`` marks a missing label,
            which the loss ignores. A star with every label missing is an error.
        ivar : array_like, (N, P), optional
            Pixels with ``ivar == 0`` are masked (fed as the mean spectrum).
        label_errors : array_like, (N, L), optional
            1-sigma errors of the training labels (astroNN adds their variance to
            the predicted one, so the network learns only the scatter beyond them).
        split : (float, float, float) or dict
            Train : validation : test ratio (5:1:2 as in StarNet's lab), or the
            parts themselves: ``{"train": rows, "val": rows}`` (and optionally
            ``"test"``), disjoint row indices, e.g. to validate on observed
            stars only while training also on synthetic spectra.
        epochs, batch_size, learning_rate, weight_decay : int, int, float, float
            Adam optimization.
        patience, min_delta : int, float
            Early stopping on the validation loss.
        lr_factor, lr_patience : float, int
            ``ReduceLROnPlateau`` on the validation loss (``lr_schedule="plateau"``).
        lr_schedule : {"plateau", "cosine"}
            "plateau" lowers the rate when the validation loss stalls; "cosine"
            lowers it every step along a half cosine from ``learning_rate`` to
            zero at the last of ``epochs`` (Loshchilov & Hutter 2017): for a
            fixed epoch budget, which a plateau rule rarely reaches the end of.
        missing_value : float or None
            Marker for a missing label besides NaN.
        max_bad_fraction : float
            A training star with more masked pixels than this is an error.
        calibrate : bool
            Rescale the predicted errors per label so that 68.3 % of the
            validation stars lie within 1 sigma (``error_scale``). The
            heteroscedastic variance is learnt with dropout on, so adding the
            MC-dropout variance double-counts some scatter, and label residuals
            have heavier tails than a Gaussian; this post-hoc step (Kuleshov
            et al. 2018) fixes both. With ``label_errors`` the validation
            labels' errors are added in quadrature first.
        calibrate_on : array_like of bool, (N,), optional
            The stars whose validation members set ``error_scale`` (default:
            every validation star). Pass False for synthetic spectra (e.g. a
            Cannon's): they know nothing of the model's misfit to real stars, so
            errors calibrated on them come out too small for real ones.
        ema_decay : float
            Keep an exponential moving average of the weights (Polyak averaging,
            decay per optimizer step, bias-corrected over the first steps); the
            averaged network is the one validated, kept and used. 0 switches it
            off. With a small, noisy validation set, early stopping on the raw
            weights picks a random point of their jitter; the average does not
            (its effect on the mock survey: ``docs/measurements.md``).
        augment_noise : float
            Data augmentation: each training batch gets fresh Gaussian noise of
            ``augment_noise`` times each pixel's own sigma (capped at
            :data:`NOISE_SIGMA_CAP`;
            needs ``ivar``);
            a regularizer against over-fitting small training sets.
        progress : bool, optional
            Progress bar per epoch (default: when stderr is a terminal).

        Returns
        -------
        self
        """
        if not 0.0 <= float(ema_decay) < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        labels = prepare_labels(labels, self.n_labels, missing_value)
        flux, good = prepare_spectra(flux, ivar)
        n, n_pix = flux.shape
        if labels.shape[0] != n:
            raise ValueError(f"labels has {labels.shape[0]} rows but flux has {n} spectra")
        bad_frac = 1.0 - good.mean(axis=1)
        if np.any(bad_frac > max_bad_fraction):
            from .._util import describe_bad
            raise ValueError(f"more than {max_bad_fraction:.0%} of the pixels are masked in "
                             f"{describe_bad(bad_frac > max_bad_fraction)}; remove them")
        if label_errors is not None:
            label_errors = np.asarray(label_errors, float)
            if label_errors.shape != labels.shape:
                raise ValueError(f"label_errors has shape {label_errors.shape}, labels "
                                 f"{labels.shape}")
            label_errors = np.where(np.isfinite(label_errors), label_errors, 0.0)
        cfg = _make_config(n_pixels=n_pix, n_labels=self.n_labels, **self._arch_args)
        tr, va, te = _split(n, split, self.seed)
        if calibrate_on is not None:
            calibrate_on = np.asarray(calibrate_on, bool)
            if calibrate_on.shape != (n,):
                raise ValueError(f"calibrate_on has shape {calibrate_on.shape}, not ({n},)")
            if calibrate and calibrate_on[va].sum() < 10:
                raise ValueError(f"only {int(calibrate_on[va].sum())} validation stars may "
                                 "calibrate the errors (calibrate_on); at least 10 are needed")
        for part, idx in (("training", tr), ("validation", va)):
            empty = np.all(np.isnan(labels[idx]), axis=0)
            if empty.any():
                raise ValueError(f"the {part} set has no value of "
                                 f"{[self.label_names[j] for j in np.flatnonzero(empty)]}")
        offsets = np.nanmean(labels[tr], axis=0)
        scales = np.nanstd(labels[tr], axis=0)
        scales = np.where(scales > 0, scales, 1.0)
        self.label_offsets, self.label_scales = offsets, scales
        self.label_range = np.column_stack([np.nanmin(labels[tr], 0), np.nanmax(labels[tr], 0)])
        self.config, self.split = cfg, {"train": tr, "val": va, "test": te}

        dev = self.device
        y = (labels - offsets) / scales
        lv = None if label_errors is None else (label_errors / scales) ** 2

        sigma = None
        if augment_noise > 0:
            if ivar is None:
                raise ValueError("augment_noise needs ivar")
            iv = np.asarray(ivar, float)
            iv = iv[None, :] if iv.ndim == 1 else iv
            sigma = np.where(good, np.minimum(1.0 / np.sqrt(np.where(good, iv, 1.0)),
                                              NOISE_SIGMA_CAP), 0.0)
            sigma_t = torch.as_tensor((augment_noise * sigma[tr]).astype(np.float32), device=dev)

        def tensors(idx):
            out = [torch.as_tensor(flux[idx], device=dev),
                   torch.as_tensor(good[idx], dtype=torch.float32, device=dev),
                   torch.as_tensor(y[idx], dtype=torch.float32, device=dev)]
            out.append(None if lv is None else torch.as_tensor(lv[idx], dtype=torch.float32,
                                                               device=dev))
            return out

        t0, c0 = time.perf_counter(), time.process_time()
        with seeded(self.seed, dev):
            net = _Net(cfg).to(dev)
            gmask = good[tr]
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(gmask.sum(0) > 0, (flux[tr] * gmask).sum(0)
                                / np.maximum(gmask.sum(0), 1), 1.0)
            resid = (flux[tr] - mean) * gmask
            scale = float(np.sqrt((resid ** 2).sum() / max(gmask.sum(), 1))) or 1.0
            net.pixel_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            net.pixel_scale.fill_(scale)
            # Polyak/EMA average of the weights: what is validated, kept and used
            ema = copy.deepcopy(net) if ema_decay > 0 else net
            ema_params, net_params = list(ema.parameters()), list(net.parameters())
            self.net = ema
            n_steps = 0
            train_t, val_t = tensors(tr), tensors(va)
            # the fused update: one pass over the weights instead of several (on CPU ~13 %
            # of a StarNet training step, docs/measurements.md)
            opt = torch.optim.Adam(net.parameters(), lr=learning_rate, weight_decay=weight_decay,
                                   fused=True)
            if lr_schedule == "cosine":
                n_total = epochs * -(-len(tr) // batch_size)
                sched = torch.optim.lr_scheduler.LambdaLR(
                    opt, lambda i: 0.5 * (1.0 + np.cos(np.pi * min(i / n_total, 1.0))))
            else:
                sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=lr_factor,
                                                                   patience=lr_patience)
            hist = {"train_loss": [], "val_loss": [], "lr": [],
                    "loss_name": "Gaussian NLL (standardized labels)"}
            best, best_state, best_epoch, wait = np.inf, None, -1, 0
            gen = torch.Generator().manual_seed(self.seed)
            bar = _progress(range(epochs), total=epochs, desc="nn-train", unit="epoch",
                            disable=None if progress is None else not progress)
            for epoch in bar:
                net.train()
                order = torch.randperm(len(tr), generator=gen).to(dev)
                total, count = 0.0, 0
                for start in range(0, len(tr), batch_size):
                    b = order[start:start + batch_size]
                    xb, gb, yb = train_t[0][b], train_t[1][b], train_t[2][b]
                    if sigma is not None:
                        xb = xb + sigma_t[b] * torch.randn(xb.shape, generator=gen).to(dev)
                    lb = None if train_t[3] is None else train_t[3][b]
                    with self._autocast():
                        mu, logv = net(xb, gb)
                    loss = masked_gaussian_nll(mu.float(), logv.float(), yb, lb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if lr_schedule == "cosine":
                        sched.step()
                    if ema is not net:
                        n_steps += 1
                        # bias-corrected (as Adam's moments): weights decay^(n-i)
                        # normalized over the steps so far, none on the initial weights
                        w = (1.0 - ema_decay) / (1.0 - ema_decay ** n_steps)
                        with torch.no_grad():
                            torch._foreach_lerp_(ema_params, net_params, w)
                    k = int(torch.isfinite(yb).sum())
                    total += float(loss.detach()) * k
                    count += k
                val = self._loss(val_t, batch_size=4 * batch_size)
                hist["train_loss"].append(total / max(count, 1))
                hist["val_loss"].append(val)
                hist["lr"].append(opt.param_groups[0]["lr"])
                if lr_schedule == "plateau":
                    sched.step(val)
                bar.set_postfix(train=f"{hist['train_loss'][-1]:.3f}", val=f"{val:.3f}")
                if val < best - min_delta:
                    best, best_epoch, wait = val, epoch, 0
                    best_state = copy.deepcopy(ema.state_dict())
                else:
                    wait += 1
                    if wait >= patience:
                        break
            bar.close()
            net = self.net = ema
            if best_state is not None:
                net.load_state_dict(best_state)
        net.eval()
        self.error_scale = np.ones(self.n_labels)
        if calibrate:
            cal = va if calibrate_on is None else va[calibrate_on[va]]
            val_err = None if label_errors is None else label_errors[cal]
            self.calibrate(flux[cal], labels[cal], np.where(good[cal], 1.0, 0.0),
                           label_errors=val_err)
        hist.update(best_epoch=best_epoch, train_time=time.perf_counter() - t0,
                    train_cpu_time=time.process_time() - c0,
                    n_epochs=len(hist["train_loss"]))
        self.history = hist
        return self

    def calibrate(self, flux, labels, ivar=None, *, label_errors=None, method="coverage",
                  n_samples=20, missing_value=MISSING_VALUE):
        """Set ``error_scale`` from stars the network was not trained on.

        :meth:`train` does this on its validation split (``method="coverage"``,
        the stated ``label_errors``). Call it again when better information
        exists: more stars with reference labels, or reference errors known to
        be wrong by some factor (from repeat observations, cluster members, or
        :func:`~cannon_fast.nn.evaluate.three_cornered_hat` against another
        pipeline). The predicted errors can only be as right as the reference
        errors: when those are as large as the network's own, every 10 % error
        in them moves the calibrated coverage by about 0.05-0.1.

        Parameters
        ----------
        flux, labels, ivar : array_like
            Spectra, reference labels (NaN / ``missing_value`` where missing), mask.
        label_errors : array_like, (N, L), optional
            1-sigma errors of ``labels``.
        method : {"coverage", "variance"}
            See :func:`~cannon_fast.nn.evaluate.calibration_scale`.
        n_samples : int
            MC-dropout samples of the predictions.

        Returns
        -------
        ndarray, (L,)
            The new ``error_scale``.
        """
        from .evaluate import calibration_scale

        self._check_trained()
        labels = prepare_labels(labels, self.n_labels, missing_value)
        res = self.predict(flux, ivar, n_samples=n_samples)
        raw = res.errors / self.error_scale
        self.error_scale = calibration_scale(res.labels, raw, labels, label_errors,
                                             method=method)
        return self.error_scale

    def _loss(self, data, batch_size):
        """Mean masked NLL on a dataset with dropout off."""
        self.net.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, data[0].shape[0], batch_size):
                sl = slice(start, start + batch_size)
                with self._autocast():
                    mu, logv = self.net(data[0][sl], data[1][sl])
                mu, logv = mu.float(), logv.float()
                yb = data[2][sl]
                k = int(torch.isfinite(yb).sum())
                lv = None if data[3] is None else data[3][sl]
                total += float(masked_gaussian_nll(mu, logv, yb, lv)) * k
                count += k
        return total / max(count, 1)

    # ------------------------------------------------------------------ inference
    def predict(self, flux, ivar=None, *, n_samples=30, batch_size=64, seed=None,
                max_bad_fraction=0.3, uncertain_thresholds=None):
        """Predict labels with MC-dropout and predicted (aleatoric) uncertainties.

        Parameters
        ----------
        flux : array_like, (N, P) or (P,)
            Normalized spectra on the training pixel grid (P must match).
        ivar : array_like, (N, P), optional
            Pixels with ``ivar == 0`` are masked; NaN flux must be masked.
        n_samples : int
            MC-dropout samples; 1 or 0 switches dropout off (errors are then the
            predicted ones only), as does a network trained without dropout.
        batch_size : int
            Spectra per forward pass (about 0.5 MB of feature maps per spectrum
            in bfloat16, twice that in float32).
        seed : int, optional
            Seed of the dropout masks (default: the regressor's seed).
        max_bad_fraction : float
            Spectra with more masked pixels get ``NO_RESULT`` and NaN labels.
        uncertain_thresholds : dict, optional
            Label name -> error above which the label is uncertain. Defaults:
            Astra's rules for TEFF (error > 300 K), LOGG (error > 0.2 and
            > 7.5 % of log g) and FE_H (error > 12 % of abs([Fe/H]); M_H likewise
            without FE_H), which set ``UNCERTAIN_TEFF``, ``UNCERTAIN_LOGG``,
            ``UNCERTAIN_FE_H``; for other labels (``UNCERTAIN_LABEL``) 0.12 dex for
            abundances (names ending in ``_H`` or ``_FE``), else half the training
            scatter.

        Returns
        -------
        NNResult
        """
        self._check_trained()
        flux, good = prepare_spectra(flux, ivar, n_pixels=self.n_pixels)
        n = flux.shape[0]
        bad_frac = 1.0 - good.mean(axis=1)
        dev = self.device
        # without dropout the samples would all be the same network: one pass does
        s_count = max(int(n_samples), 1) if self.config["dropout"] > 0 else 1
        mean = np.empty((n, self.n_labels))
        mvar = np.zeros((n, self.n_labels))
        avar = np.empty((n, self.n_labels))
        net = self.net
        net.eval()
        # one autocast region for all batches, under no_grad: autocast keeps its bfloat16
        # copies of the weights only within a region, and only for tensors that require
        # grad, which inference_mode hides from it; re-casting the 8.4 M dense weights per
        # batch cost ~60 % of that layer's time
        with seeded(self.seed if seed is None else seed, dev), torch.no_grad(), \
                self._autocast():
            for start in range(0, n, batch_size):
                sl = slice(start, start + batch_size)
                xb = torch.as_tensor(flux[sl], device=dev)
                gb = torch.as_tensor(good[sl], dtype=torch.float32, device=dev)
                z = net.trunk(xb, gb)  # (B, H1)
                b = z.shape[0]
                out = _mc_head(net.head, z.repeat(s_count, 1), s_count > 1)
                mu, logv = net.split(out.reshape(s_count, b, -1).float())  # (S, B, L)
                mean[sl] = mu.mean(0).double().cpu().numpy()
                if s_count > 1:
                    mvar[sl] = mu.var(0).double().cpu().numpy()
                avar[sl] = torch.exp(logv).mean(0).double().cpu().numpy()
        labels = mean * self.label_scales + self.label_offsets
        model_err = np.sqrt(mvar) * self.label_scales * self.error_scale
        pred_err = np.sqrt(avar) * self.label_scales * self.error_scale
        errors = np.hypot(model_err, pred_err)
        no_result = bad_frac > max_bad_fraction
        for a in (labels, errors, model_err, pred_err):
            a[no_result] = np.nan
        thr = self._thresholds(uncertain_thresholds)
        given = {k.upper() for k in (uncertain_thresholds or {})}
        names = [nm.upper() for nm in self.label_names]
        feh = "FE_H" if "FE_H" in names else "M_H"
        with np.errstate(invalid="ignore", divide="ignore"):
            uncertain = errors > thr
            # Astra's rules, unless the caller set that label's threshold
            if "LOGG" in names and "LOGG" not in given:
                j = names.index("LOGG")
                uncertain[:, j] &= np.abs(errors[:, j] / labels[:, j]) > 0.075
            if feh in names and feh not in given:
                j = names.index(feh)
                uncertain[:, j] = np.abs(errors[:, j] / labels[:, j]) > 0.12
            lo, hi = self.label_range.T
            outside = ((labels < lo) | (labels > hi)).any(axis=1)
        flags = np.zeros(n, np.int64)
        named = {"LOGG": "UNCERTAIN_LOGG", "TEFF": "UNCERTAIN_TEFF", feh: "UNCERTAIN_FE_H"}
        for j, nm in enumerate(names):
            flags[uncertain[:, j]] |= NNResult.FLAGS[named.get(nm, "UNCERTAIN_LABEL")]
        flags[outside] |= NNResult.FLAGS["OUT_OF_RANGE"]
        flags[no_result] |= NNResult.FLAGS["NO_RESULT"]
        return NNResult(labels=labels, errors=errors, model_errors=model_err,
                        predictive_errors=pred_err, flags=flags, uncertain=uncertain,
                        bad_pixel_fraction=bad_frac, label_names=self.label_names)

    def _thresholds(self, given):
        """(L,) uncertain-label thresholds in physical units."""
        given = {k.upper(): float(v) for k, v in (given or {}).items()}
        unknown = set(given) - {n.upper() for n in self.label_names}
        if unknown:
            raise ValueError(f"uncertain_thresholds names unknown labels {sorted(unknown)}")
        out = np.empty(self.n_labels)
        for j, name in enumerate(self.label_names):
            key = name.upper()
            default = DEFAULT_UNCERTAIN.get(key)
            if default is None:  # abundances ([X/H], [X/Fe]) as [Fe/H]; else half the scatter
                default = (DEFAULT_UNCERTAIN["FE_H"] if key.endswith(("_H", "_FE"))
                           else 0.5 * self.label_scales[j])
            out[j] = given.get(key, default)
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path):
        """Write a checkpoint (architecture, version, label scaling, weights, history).

        Readable with ``torch.load(path, weights_only=True)``; written atomically.
        """
        self._check_trained()
        extra = {
            "label_names": list(self.label_names),
            "label_offsets": torch.as_tensor(self.label_offsets, dtype=torch.float64),
            "label_scales": torch.as_tensor(self.label_scales, dtype=torch.float64),
            "label_range": torch.as_tensor(self.label_range, dtype=torch.float64),
            "error_scale": torch.as_tensor(self.error_scale, dtype=torch.float64),
            "seed": self.seed,
            "history": {k: (list(map(float, v)) if isinstance(v, list)
                            else v if isinstance(v, str) else float(v))
                        for k, v in self.history.items()},
            "split": {k: torch.as_tensor(v, dtype=torch.int64) for k, v in self.split.items()},
        }
        save_checkpoint(path, "regressor", self.config, self.net.state_dict(), extra)

    @classmethod
    def load(cls, path, device="auto", arch=None, precision="float32"):
        """Read a checkpoint written by :meth:`save`.

        Parameters
        ----------
        path : str or os.PathLike
        device : str or torch.device
        arch : {"cnn", "mlp"}, optional
            Require this architecture.
        precision : {"float32", "bfloat16"}
            Arithmetic of the layers (see the class).

        Raises
        ------
        ValueError
            Another kind of network or architecture, another checkpoint format
            version, or weights that do not match the stored architecture.
        """
        ck = load_checkpoint(path, "regressor")
        cfg = dict(ck["config"])
        if arch is not None and cfg.get("arch") != arch:
            raise ValueError(f"{path} holds a {cfg.get('arch')!r} regressor, not {arch!r}")
        args = {k: cfg[k] for k in ("arch", "hidden", "dropout")}
        if cfg["arch"] == "cnn":
            args.update({k: cfg[k] for k in ("filters", "kernel_size", "stride", "pool_size")})
        self = cls(ck["label_names"], device=device, seed=ck.get("seed", 0),
                   precision=precision, **args)
        expected = _make_config(n_pixels=cfg["n_pixels"], n_labels=self.n_labels,
                                **self._arch_args)
        if expected != cfg:
            raise ValueError(f"{path}: inconsistent architecture in the checkpoint: {cfg}")
        net = _Net(cfg)
        try:
            net.load_state_dict(ck["state_dict"])
        except RuntimeError as err:
            raise ValueError(f"{path}: the weights do not fit the stored architecture "
                             f"{cfg['arch']!r}: {err}") from err
        self.net = net.to(self.device).eval()
        self.config = cfg
        self.label_offsets = ck["label_offsets"].numpy()
        self.label_scales = ck["label_scales"].numpy()
        self.label_range = ck["label_range"].numpy()
        self.error_scale = ck["error_scale"].numpy()
        self.history = dict(ck.get("history", {}))
        self.split = {k: v.numpy() for k, v in ck.get("split", {}).items()}
        return self

    def plot_loss(self, path=None):
        """Plot training and validation loss per epoch; save to ``path`` if given.

        Returns
        -------
        matplotlib.figure.Figure
        """
        from .evaluate import plot_loss

        return plot_loss(self.history, path)


def format_layer_summary(rows):
    """Text table of :meth:`SpectrumRegressor.layer_summary` rows, with the total."""
    lines = [f"{'layer':<14s}{'output shape':>18s}{'parameters':>14s}"]
    for r in rows:
        lines.append(f"{r['layer']:<14s}{str(tuple(r['output_shape'])):>18s}"
                     f"{r['n_parameters']:>14,d}")
    lines.append(f"{'total':<14s}{'':>18s}{sum(r['n_parameters'] for r in rows):>14,d}")
    return "\n".join(lines)
