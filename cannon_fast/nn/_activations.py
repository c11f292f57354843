"""The emulators' hidden-layer activations and their slopes, in numpy.

Apart from ``emulator`` so that the fast fit (``fast_fit``), which the emulator's own
``fit`` calls, reads them without importing the emulator back.
"""
import numpy as np

#: Hidden-layer activations: name -> (torch module name, value, derivative) given the
#: pre-activation h (LeakyReLU's slope is the emulator's ``negative_slope``).
ACTIVATIONS = ("leaky_relu", "silu", "tanh")


def _activate(name, h, slope):
    if name == "leaky_relu":
        return np.where(h > 0, h, slope * h)
    if name == "silu":
        return h / (1.0 + np.exp(-h))
    return np.tanh(h)


def _activation_slope(name, h, slope):
    if name == "leaky_relu":
        return np.where(h > 0, 1.0, slope)
    if name == "silu":
        sig = 1.0 / (1.0 + np.exp(-h))
        return sig * (1.0 + h * (1.0 - sig))
    return 1.0 - np.tanh(h) ** 2
