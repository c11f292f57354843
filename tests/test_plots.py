"""The lab's figures on small synthetic inputs: each renders to PNG with the expected axes."""
import numpy as np
import pytest

from cannon_fast.lab.plots import lab as pl
from cannon_fast.testing import make_synthetic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def syn():
    return make_synthetic(n_stars=64, n_pix=200, n_labels=5, seed=0)


@pytest.fixture(scope="module")
def wave():
    return np.linspace(15950.0, 16150.0, 200)


@pytest.fixture(scope="module")
def model(syn):
    from cannon_fast import CannonModel
    return CannonModel(syn.label_names, order=2, backend="numpy").train(syn.flux, syn.ivar,
                                                                      syn.labels)


def _save(fig, tmp_path, name):
    path = tmp_path / f"{name}.png"
    fig.savefig(path, dpi=60)
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_MAGIC
    return path


def _texts(fig):
    out = []
    for ax in fig.axes:
        out += [ax.get_xlabel(), ax.get_ylabel(), ax.get_title()]
        out += [t.get_text() for t in ax.texts]
    out += [t.get_text() for t in fig.texts]
    if fig._suptitle is not None:
        out.append(fig._suptitle.get_text())
    return " ".join(out)


def test_spectrum_has_units_and_a_gap(syn, wave, tmp_path):
    flux = 500.0 * syn.flux[0]
    flux[90:110] = 0.0  # a chip gap: zeros in an apStar file
    fig = pl.plot_spectrum(wave, flux, title="star")
    _save(fig, tmp_path, "spectrum")
    ax = fig.axes[0]
    assert "erg" in ax.get_ylabel() and "wavelength" in ax.get_xlabel()
    y = ax.lines[-1].get_ydata()
    assert np.isnan(y[90:110]).all() and np.isfinite(y[:90]).all()
    lo, hi = ax.get_ylim()
    assert lo <= np.nanmin(y) and hi >= np.nanpercentile(y, 99)  # no line clipped


def test_corner_has_one_panel_per_label_pair(syn, tmp_path):
    fig = pl.plot_corner(syn.labels, syn.label_names, title="kept")
    _save(fig, tmp_path, "corner")
    assert len(fig.axes) == 25
    assert "[Fe/H]" in _texts(fig)
    # diagonal titles: the median and 16/84 % spread, digits per label (whole kelvin)
    teff = fig.axes[0].get_title()
    med = np.median(syn.labels[:, 0])
    assert teff.startswith(f"$T_\\mathrm{{eff}}$ = {med:.0f}$") and teff.endswith(" K"), teff


def test_label_text_is_one_table_for_axes_and_titles():
    from cannon_fast.lab.plots._labels import axis_label, label_name, value_title
    assert axis_label("fe_h") == "[Fe/H] [dex]" and label_name("FE_H") == "[Fe/H]"
    assert axis_label("VMICRO") == label_name("VMICRO") == "VMICRO"  # unknown: as given
    # decimals set by the smaller error, the same for median and errors; no "dex" unit
    assert value_title("FE_H", 0.19304, 0.0068, 0.0071) == "[Fe/H] = 0.1930$^{+0.0071}_{-0.0068}$"
    assert value_title("TEFF", 4669.4, 0.3, 8.2).endswith("4669$^{+8}_{-0}$ K")  # whole kelvin


def test_corner_needs_enough_stars(syn):
    with pytest.raises(ValueError, match="more than 5 stars"):
        pl.plot_corner(syn.labels[:3], syn.label_names)


def test_continuum_two_panels(syn, wave, tmp_path):
    cont = 400.0 + 50.0 * np.linspace(-1, 1, wave.size) ** 2
    fig = pl.plot_continuum(wave, syn.flux[0] * cont, cont, syn.flux[0], good=syn.ivar[0] > 0,
                            continuum_pixels=syn.coeffs[:, 0] < 0.01, title="star")
    _save(fig, tmp_path, "continuum")
    assert len(fig.axes) == 2
    assert "normalized" in fig.axes[1].get_ylabel()
    assert any("continuum" in str(t.get_text()) for t in fig.axes[0].get_legend().get_texts())
    # the legend says how many of the mask's pixels this star's fit used
    mask = syn.coeffs[:, 0] < 0.01
    used = int(np.sum(mask & (syn.ivar[0] > 0)))
    assert any(f"{used} of the mask's {int(mask.sum())}" in t.get_text()
               for t in fig.axes[0].get_legend().get_texts())


def test_data_vs_model_has_residual_panel(syn, wave, tmp_path):
    fig = pl.plot_data_vs_model(wave, syn.flux[0], syn.ivar[0], syn.true_flux[0],
                                wave_range=(16000.0, 16100.0), title="star")
    _save(fig, tmp_path, "dvm")
    assert len(fig.axes) == 2
    assert fig.axes[1].get_xlim() == (16000.0, 16100.0)
    assert "model" in fig.axes[1].get_ylabel()


def test_gradients_mark_lines_on_the_abundance_panels(model, wave, tmp_path):
    lines = {"Mg I": [16000.0, 16050.0], "Si I": [16100.0]}
    grads = model.gradient(np.median(model.training_labels, axis=0))
    fig = pl.plot_gradient_spectra(wave, grads, model.label_names, lines=lines,
                                   lines_source="test")
    _save(fig, tmp_path, "gradients")
    assert len(fig.axes) == 5
    n_vlines = [sum(1 for ln in ax.lines if np.ptp(ln.get_xdata()) == 0) for ax in fig.axes]
    assert n_vlines == [0, 0, 0, 3, 3]
    assert "Mg/Fe" in fig.axes[3].get_ylabel()
    for ax in fig.axes:  # no feature clipped
        y = np.asarray(ax.lines[0].get_ydata(), float)
        lo, hi = ax.get_ylim()
        assert lo < np.nanmin(y) and hi > np.nanmax(y)


def test_gradients_reject_wrong_shape(model, wave):
    with pytest.raises(ValueError, match="gradients must have shape"):
        pl.plot_gradient_spectra(wave, np.zeros((4, wave.size)), model.label_names)


def test_s2_log_scale(model, wave, tmp_path):
    fig = pl.plot_s2(wave, model.s2)
    _save(fig, tmp_path, "s2")
    assert fig.axes[0].get_yscale() == "log"
    assert "s_" in fig.axes[0].get_ylabel()


def test_s2_counts_zero_scatter_only_where_there_is_data(tmp_path):
    from cannon_fast.apogee.files import NPIX, on_chip_mask
    wave = np.linspace(15100.0, 17000.0, NPIX)
    s2 = np.full(NPIX, 1e-6)
    s2[~on_chip_mask()] = 0.0            # chip gaps and ends: no data
    s2[np.flatnonzero(on_chip_mask())[100:107]] = 0.0   # 7 pixels fitted with s = 0
    fig = pl.plot_s2(wave, s2)
    _save(fig, tmp_path, "s2_apstar")
    assert fig.axes[0].get_title(loc="right").startswith("7 of ")


def test_one_to_one_reports_bias_and_scatter(syn, tmp_path):
    rng = np.random.default_rng(1)
    fitted = syn.labels + rng.normal(0, 1, syn.labels.shape) * [30, 0.05, 0.02, 0.02, 0.02]
    fig = pl.plot_one_to_one(syn.labels, fitted, syn.label_names, "true",
                             highlight=np.arange(64) < 3)
    _save(fig, tmp_path, "cv")
    assert len(fig.axes) == 10
    text = _texts(fig)
    assert text.count("bias") == 5 and text.count("scatter") >= 5
    assert "true" in fig.axes[5].get_xlabel()


def test_outliers_one_row_each(syn, wave, tmp_path):
    fig = pl.plot_outliers(wave, syn.flux[:3], syn.ivar[:3], syn.true_flux[:3], ["a", "b", "c"],
                           ["noise", "continuum", "catalog"], wave_range=(15960.0, 16140.0))
    _save(fig, tmp_path, "outliers")
    assert len(fig.axes) == 3
    assert fig.axes[1].get_title(loc="left") == "b: continuum"


def test_kiel_axes_inverted_with_isochrone(syn, tmp_path):
    iso = [dict(teff=np.linspace(5000, 4000, 20), logg=np.linspace(3.5, 1.0, 20), label="iso")]
    fig = pl.plot_kiel(syn.labels[:, 0], syn.labels[:, 1], syn.labels[:, 2], isochrones=iso,
                       note="the survey's own giant branch")
    _save(fig, tmp_path, "kiel")
    ax = fig.axes[0]
    assert ax.get_xlim()[0] > ax.get_xlim()[1] and ax.get_ylim()[0] > ax.get_ylim()[1]
    # every star inside the inverted axes, with a margin
    assert ax.get_xlim()[1] < syn.labels[:, 0].min() and ax.get_xlim()[0] > syn.labels[:, 0].max()
    assert ax.get_ylim()[1] < syn.labels[:, 1].min() and ax.get_ylim()[0] > syn.labels[:, 1].max()
    assert "[Fe/H]" in fig.axes[1].get_ylabel()  # the colour bar
    assert ax.get_legend() is not None


def test_read_line_file_converts_air_to_vacuum(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("15740.716   ;Mg I\n15007.692   ;Fe I\n15960.063   ;Si I\nbad line\n")
    lines = pl.read_line_file(path)
    assert set(lines) == {"Mg I", "Si I"}
    assert 4.0 < lines["Mg I"][0] - 15740.716 < 4.6  # n_air - 1 ~ 2.7e-4 in the H band
    with pytest.raises(ValueError, match="no lines"):
        pl.read_line_file(path, species=("Al I",))
    with pytest.raises(FileNotFoundError):
        pl.read_line_file(tmp_path / "missing.txt")


def test_known_lines_default_has_mg_and_si():
    lines, source = pl.known_lines()
    assert len(lines["Mg I"]) >= 3 and len(lines["Si I"]) >= 3
    assert all(15000 < w < 17100 for ws in lines.values() for w in ws)
    assert source


def test_bias_scatter_hand_case():
    fit = np.array([[1.0], [3.0], [np.nan]])
    ref = np.zeros((3, 1))
    bias, std, rms, mad = pl.bias_scatter(fit, ref)
    assert bias[0] == 2.0 and np.isclose(std[0], np.sqrt(2.0))
    assert np.isclose(rms[0], np.sqrt(5.0)) and np.isclose(mad[0], 1.4826)


def test_broadening_against_the_true_macroturbulence(tmp_path):
    """b made from the part of vmacro² the labels do not predict: the slope shown is 1."""
    rng = np.random.default_rng(2)
    teff, logg = rng.uniform(4000, 5200, 300), rng.uniform(1.0, 3.5, 300)
    vmac = 6.0 + 0.9 * (2.5 - logg) + rng.normal(0, 0.6, 300)  # FWHM, km/s
    var = (vmac / 2.3548) ** 2
    trend = np.polyval(np.polyfit(logg, var, 2), logg)
    b = var - trend + rng.normal(0, 0.05, 300)
    fig = pl.plot_broadening(b, np.full(300, 0.3), teff, logg, true_vmacro=vmac)
    _save(fig, tmp_path, "broadening")
    legend = fig.axes[-1].get_legend().get_texts()[0].get_text()
    slope = float(legend.split("slope ")[1].split(",")[0])
    assert slope == pytest.approx(1.0, abs=0.05), legend
    one = pl.plot_broadening(b, np.full(300, 0.3), teff, logg)
    assert len([ax for ax in one.axes if ax.get_label() != "<colorbar>"]) == 1
    with pytest.raises(ValueError, match="no finite broadening"):
        pl.plot_broadening(np.full(3, np.nan), np.ones(3), teff[:3], logg[:3])
