"""docs/api.md against the code: imports, signatures and defaults, attributes, flag values.

api.md's convention (stated at its top): in the code blocks the first call of a function or
method is its signature, so each keyword given a literal value there must exist with that
default; later calls are examples, whose keywords must exist. Which documented name means
which object is the explicit table ``DOCUMENTED`` below.
"""
import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from cannon_fast import _util, survey, testing
from cannon_fast.apogee import files as apogee
from cannon_fast.core import binaries, continuum, fitting
from cannon_fast.core.grid import PixelGrid
from cannon_fast.core.model import CannonModel
from cannon_fast.instruments import (CrossMatch, crossmatch_sets, parse_row_index,
                                     read_spectra, read_spectrum_tables)
from cannon_fast.instruments.read import Spectra
from cannon_fast.lab import mist_web, pipeline
from cannon_fast.lab.jwst import run_jwst_report, train_starnet_with_cannon
from cannon_fast.lab.transfer import transfer_labels
from cannon_fast.apogee import catalog
from cannon_fast.core import broadening, information
from cannon_fast.nn import NNResult, PayneEmulator, SpectrumRegressor, ab_initio, train_emulator
from cannon_fast.nn import dd_payne, transformer
from cannon_fast.nn.distance import DistanceNetwork
from cannon_fast.store import SpectraStore

API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"

#: Documented call -> the object it documents, and where a ``**kwargs`` of it goes.
DOCUMENTED = {
    "CannonModel": (CannonModel, None),
    "PixelGrid": (PixelGrid, None),
    "PixelGrid.from_wavelength": (PixelGrid.from_wavelength, None),
    "PixelGrid.linear": (PixelGrid.linear, None),
    "PixelGrid.log_uniform": (PixelGrid.log_uniform, None),
    "PixelGrid.aspcap": (PixelGrid.aspcap, None),
    "PixelGrid.apstar": (PixelGrid.apstar, None),
    "PixelGrid.builtin": (PixelGrid.builtin, None),
    "grid.nearest_pixels": (PixelGrid.nearest_pixels, None),
    "grid.inner_pixels": (PixelGrid.inner_pixels, None),
    "fit_broadened": (fitting.fit_broadened, None),
    "m.train": (CannonModel.train, None),
    "m.scale_labels": (CannonModel.scale_labels, None),
    "m.unscale_labels": (CannonModel.unscale_labels, None),
    "m.label_derivatives": (CannonModel.label_derivatives, None),
    "m.predict": (CannonModel.predict, None),
    "m.gradient": (CannonModel.gradient, None),
    "m.predict_with_jacobian": (CannonModel.predict_with_jacobian, None),
    "m.write": (CannonModel.write, None),
    "CannonModel.read": (CannonModel.read, None),
    "m.fit": (CannonModel.fit, fitting.fit_cannon),
    "m.calibrate_errors": (CannonModel.calibrate_errors, None),
    "screen_binaries": (binaries.screen_binaries, None),
    "train_secondary_model": (binaries.train_secondary_model, None),
    "fitted_spectra": (fitting.fitted_spectra, None),
    "run_lab": (pipeline.run_lab, None),
    "cross_validate": (pipeline.cross_validate, None),
    "atomic_path": (_util.atomic_path, None),
    "progress": (_util.progress, None),
    "quiet": (_util.quiet, None),
    "describe_bad": (_util.describe_bad, None),
    "cache_root": (_util.cache_root, None),
    "fetch_mist": (mist_web.fetch_mist, None),
    "mist_isochrones": (mist_web.mist_isochrones, None),
    "make_synthetic": (testing.make_synthetic, None),
    "read_apstar": (apogee.read_apstar, None),
    "normalize": (continuum.normalize, None),
    "record_continuum": (continuum.record_continuum, None),
    "renormalize_to_model": (continuum.renormalize_to_model, None),
    "model_continuum": (continuum.model_continuum, None),
    "label_survey": (survey.label_survey, None),
    "read_normalized": (survey.read_normalized, None),
    "summary.report": (survey.SurveySummary.report, None),
    "SpectrumRegressor": (SpectrumRegressor, None),
    "reg.train": (SpectrumRegressor.train, None),
    "reg.predict": (SpectrumRegressor.predict, None),
    "reg.calibrate": (SpectrumRegressor.calibrate, None),
    "train_emulator": (train_emulator, None),
    "cannon_fast.fit_spectra": (fitting.fit_spectra, fitting.fit_generic),
    "read_spectra": (read_spectra, None),
    "read_spectrum_tables": (read_spectrum_tables, None),
    "sp.labels": (Spectra.labels, None),
    "parse_row_index": (parse_row_index, None),
    "crossmatch_sets": (crossmatch_sets, None),
    "cm.describe": (CrossMatch.describe, None),
    "run_jwst_report": (run_jwst_report, None),
    "train_starnet_with_cannon": (train_starnet_with_cannon, None),
    "transfer_labels": (transfer_labels, None),
    "reg.layer_summary": (SpectrumRegressor.layer_summary, None),
    "DistanceNetwork": (DistanceNetwork, SpectrumRegressor),
    "net.train": (DistanceNetwork.train, SpectrumRegressor.train),
    "net.predict": (DistanceNetwork.predict, None),
    "distance_training_cuts": (catalog.distance_training_cuts, None),
    "read_distance_catalog": (catalog.read_distance_catalog, None),
    "information_content": (information.information_content, None),
    "info.top_pixels": (information.InformationContent.top_pixels, None),
    "bound_vs_snr": (information.bound_vs_snr, information.information_content),
    "CallableModel": (information.CallableModel, None),
    "broaden": (broadening.broaden, None),
    "BroadenedForwardModel": (broadening.BroadenedForwardModel, None),
    "lsf_matrix": (broadening.lsf_matrix, None),
    "label_design": (ab_initio.label_design, None),
    "train_on_model": (ab_initio.train_on_model, train_emulator),
    "emulation_errors": (ab_initio.emulation_errors, None),
    "degrade_spectra": (ab_initio.degrade_spectra, None),
    "train_on_spectra": (ab_initio.train_on_spectra, train_emulator),
    "emu.outside_training": (PayneEmulator.outside_training, None),
    "emu.predict": (PayneEmulator.predict, None),
    "PayneEmulator.read": (PayneEmulator.read, None),
    "train_transformer": (transformer.train_transformer, None),
    "tp.predict": (transformer.TransformerPayne.predict, None),
    "GradientTemplate.from_model": (dd_payne.GradientTemplate.from_model, None),
    "GradientTemplate": (dd_payne.GradientTemplate, None),
    "tpl.masked": (dd_payne.GradientTemplate.masked, None),
    "tpl.write": (dd_payne.GradientTemplate.write, None),
    "GradientTemplate.read": (dd_payne.GradientTemplate.read, None),
    "train_dd_payne": (dd_payne.train_dd_payne, None),
    "dd.gradient_spectra": (dd_payne.DataDrivenPayne.gradient_spectra, None),
    "dd.gradient_mismatch": (dd_payne.DataDrivenPayne.gradient_mismatch, None),
    "DataDrivenPayne.read": (dd_payne.DataDrivenPayne.read, None),
}
#: Calls in the code blocks that document nothing of this package.
NOT_API = {"print"}


def _strip_comment(line):
    """The line without its ``#`` comment (a ``#`` inside quotes is kept)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[:i]
    return line


def _code():
    """The python code blocks of api.md, comments removed, as one text."""
    blocks = re.findall(r"```python\n(.*?)```", API_MD.read_text(), flags=re.S)
    assert blocks, "api.md has no python code blocks"
    return "\n".join(_strip_comment(line) for block in blocks for line in block.splitlines())


def _calls(code, name):
    """Every ``name(...)`` in the code, parsed: a list of ast.Call, first occurrence first."""
    out = []
    for m in re.finditer(r"(?<![\w.])" + re.escape(name) + r"\(", code):
        depth, quote = 0, None
        for j in range(m.end() - 1, len(code)):
            ch = code[j]
            if quote:
                quote = None if ch == quote else quote
            elif ch in "\"'":
                quote = ch
            elif ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth -= 1
                if depth == 0:
                    break
        text = "f" + code[m.end() - 1:j + 1]
        out.append(ast.parse(" ".join(text.split()), mode="eval").body)
    return out


def _parameters(obj, delegate):
    """(positional parameter names, {keyword: default}) of a documented object."""
    params = list(inspect.signature(obj).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    positional = [p.name for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keywords = {p.name: p.default for p in params
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if delegate is not None and any(p.kind == p.VAR_KEYWORD for p in params):
        for p in inspect.signature(delegate).parameters.values():
            keywords.setdefault(p.name, p.default)
    return positional, keywords


def test_parser_reads_a_default_it_is_shown():
    """The check below fails on a wrong default (the n_starts="auto" of an old api.md)."""
    code = 'm.fit(flux, ivar, debias=True,\n      n_starts="auto") -> FitResult'
    (call,) = _calls(code, "m.fit")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    assert kw == {"debias": True, "n_starts": "auto"}
    _, defaults = _parameters(*DOCUMENTED["m.fit"])
    assert defaults["n_starts"] != kw["n_starts"]


def test_every_documented_call_is_checked():
    code = _code()
    called = set(re.findall(r"(?<![\w.])((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)\(", code))
    assert called - set(DOCUMENTED) - NOT_API == set(), "add them to DOCUMENTED"


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_documented_keywords_exist_with_their_defaults(name):
    calls = _calls(_code(), name)
    assert calls, f"{name}( is not in api.md's code blocks any more"
    positional, keywords = _parameters(*DOCUMENTED[name])
    for i, call in enumerate(calls):
        shown = ast.unparse(call)
        given = [a for a in call.args if not (isinstance(a, ast.Constant) and a.value is ...)]
        if not any(p.kind == p.VAR_POSITIONAL
                   for p in inspect.signature(DOCUMENTED[name][0]).parameters.values()):
            assert len(given) <= len(positional), f"{name}: too many positional in {shown}"
        for k in call.keywords:
            assert k.arg in keywords, f"{name} has no keyword {k.arg!r} (api.md: {shown})"
            if i > 0:  # an example
                continue
            try:
                documented = ast.literal_eval(k.value)
            except ValueError:  # a name standing for a value: no default claimed
                continue
            assert keywords[k.arg] is not inspect.Parameter.empty, \
                f"{name}: {k.arg} has no default, api.md says {documented!r}"
            assert documented == keywords[k.arg], \
                f"{name}: {k.arg}={keywords[k.arg]!r} in the code, {documented!r} in api.md"


def test_api_md_imports_work():
    for line in _code().splitlines():
        if re.match(r"\s*(from \S+ )?import ", line):
            exec(line.strip(), {})


def test_documented_model_attributes_exist():
    syn = testing.make_synthetic(n_stars=40, n_pix=20, n_labels=2, seed=0)
    m = CannonModel(syn.label_names).train(syn.flux, syn.ivar, syn.labels)
    names = set(re.findall(r"(?<![\w.])m\.(\w+)", _code()))
    assert len(names) > 20
    assert [n for n in sorted(names) if not hasattr(m, n)] == []


def _field_names(cls):
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(getattr(cls, "_fields", ()))


@pytest.mark.parametrize("pattern, cls", [
    (r"# NormalizedSpectra\(([^)]*)\)", continuum.NormalizedSpectra),
    (r"# SyntheticSpectra\(([^)]*)\)", testing.SyntheticSpectra),
    (r"# ApStar: ([^\n]*)", apogee.ApStar),
    (r"SpectraStore[^\n]*\n#\s+(\.[^\n]*)", SpectraStore),
    (r"# NNResult: ([^\n]*)", NNResult),
])
def test_documented_result_fields_exist(pattern, cls):
    (text,) = re.findall(pattern, API_MD.read_text())
    text = re.sub(r"\([^()]*\)", "", text)  # "(rows)", "(NaN where unknown)", "()"
    names = set(re.findall(r"[A-Za-z_]\w*", text))
    assert names, text
    assert [n for n in sorted(names) if n not in _field_names(cls) and not hasattr(cls, n)] == []


def test_fit_result_fields_and_flags_are_the_documented_ones():
    text = API_MD.read_text()
    para = text[text.index("`FitResult` fields:"):]
    para = para[:para.index("`to_table()`") + len("`to_table()`")]
    documented = set()
    for item in re.findall(r"`([^`]+)`", para):
        name = re.match(r"[\w.]+", item).group()
        if "." in name:  # FitResult.FLAGS, fitting.sparse_training, ...
            owner, attr = name.split(".")
            assert hasattr({"FitResult": fitting.FitResult, "fitting": fitting}[owner], attr), item
        elif name != "FitResult":
            documented.add(name)
    fields = _field_names(fitting.FitResult)
    assert fields - documented == set(), "FitResult fields missing from api.md"
    assert [n for n in documented if not hasattr(fitting.FitResult, n) and n not in fields] == []
    flags = re.search(r"`FitResult.FLAGS` = (\{.*?\})", para, flags=re.S).group(1)
    assert ast.literal_eval(flags) == fitting.FitResult.FLAGS
