"""The method registry: parsing every form, clear errors, and building the caches that exist everywhere."""

import importlib.util

import pytest
from transformers import DynamicCache, QuantizedCache

import leankv_hf
from leankv_hf.eval.methods import MethodSpec, available_methods, make_cache, method_label, parse_method, split_methods
from leankv_hf.testing import tiny_model


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("full", MethodSpec("full", {})),
        ("hf-quanto:2", MethodSpec("hf-quanto", {"nbits": 2})),
        ("hf-hqq:4", MethodSpec("hf-hqq", {"nbits": 4})),
        ("hf-fp8", MethodSpec("hf-fp8", {})),
        ("hetero:k8v4", MethodSpec("hetero", {"key_bits": 8, "value_bits": 4})),
        (
            "hetero:k4v2,g32,chan,r64",
            MethodSpec(
                "hetero",
                {"key_bits": 4, "value_bits": 2, "group_size": 32, "key_axis": "channel", "residual_length": 64},
            ),
        ),
        ("sparse:adakv@0.2", MethodSpec("sparse", {"policy": "adakv", "budget": 0.2})),
        ("sparse:snapkv@512", MethodSpec("sparse", {"policy": "snapkv", "budget": 512})),
        ("sparse:h2o@0.1", MethodSpec("sparse", {"policy": "h2o", "budget": 0.1})),
        (
            "unified:k8v4/k4v2,pr0.8,adakv",
            MethodSpec("unified", {"high": (8, 4), "low": (4, 2), "prune_ratio": 0.8, "policy": "adakv"}),
        ),
        ("unified:leankv-m", MethodSpec("unified", {"preset": "leankv-m"})),
        ("unified:leankv,g16", MethodSpec("unified", {"preset": "leankv", "group_size": 16})),
        (
            "unified:k8v4/k4v2,ap0.02,aq1.0",
            MethodSpec("unified", {"high": (8, 4), "low": (4, 2), "alpha_prune": 0.02, "alpha_quant": 1.0}),
        ),
        (
            {"method": "hetero", "key_bits": 4, "value_bits": 2, "name": "mine"},
            MethodSpec("hetero", {"key_bits": 4, "value_bits": 2}),
        ),
    ],
)
def test_parse_forms(spec, expected):
    assert parse_method(spec) == expected


@pytest.mark.parametrize(
    "spec", ["nope", "full:3", "hf-quanto", "hf-quanto:x", "hetero:k8", "sparse:adakv", "hf-fp8:2"]
)
def test_unknown_forms_list_the_valid_ones(spec):
    with pytest.raises(ValueError, match="valid forms") as error:
        parse_method(spec)
    assert "hetero:kKvV" in str(error.value) and "sparse:POLICY@BUDGET" in str(error.value)


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="unknown option 'zz1'"):
        parse_method("hetero:k8v4,zz1")


def test_yaml_files(tmp_path):
    pipeline = tmp_path / "lean.yaml"
    pipeline.write_text("pipeline:\n  - quantize: {bits: 4}\n")
    assert parse_method(str(pipeline)) == MethodSpec(
        "unified-config", {"config": {"pipeline": [{"quantize": {"bits": 4}}]}}
    )
    hetero = tmp_path / "hetero.yml"
    hetero.write_text("method: hetero\nkey_bits: 8\nvalue_bits: 4\ngroup_size: 32\n")
    assert parse_method(str(hetero)) == MethodSpec("hetero", {"key_bits": 8, "value_bits": 4, "group_size": 32})
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: nope\n")
    with pytest.raises(ValueError, match="valid forms"):
        parse_method(str(bad))


def test_split_methods_keeps_options_with_their_method():
    text = "full, hf-quanto:4,hetero:k8v4,g32,chan,sparse:adakv@0.2,unified:k8v4/k4v2,ap0.02,aq1.0,my.yaml"
    assert split_methods(text) == [
        "full",
        "hf-quanto:4",
        "hetero:k8v4,g32,chan",
        "sparse:adakv@0.2",
        "unified:k8v4/k4v2,ap0.02,aq1.0",
        "my.yaml",
    ]


def test_labels_and_docs():
    assert method_label("hetero:k8v4") == "hetero:k8v4"
    assert method_label({"method": "hetero", "name": "mine"}) == "mine"
    assert method_label({"method": "full"}) == '{"method":"full"}'
    assert len(available_methods()) == 8


def test_make_full_cache():
    model = tiny_model()
    cache = make_cache("full", model)
    assert isinstance(cache, DynamicCache) and len(cache.layers) == model.config.num_hidden_layers


@pytest.mark.skipif(importlib.util.find_spec("optimum.quanto") is None, reason="optimum-quanto not installed")
def test_make_quanto_cache():
    cache = make_cache("hf-quanto:2", tiny_model())
    assert isinstance(cache, QuantizedCache) and cache.layers[0].nbits == 2


def test_missing_backend_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "optimum.quanto" else real(name, *a)
    )
    with pytest.raises(ImportError, match="pip install optimum-quanto"):
        make_cache("hf-quanto:4", tiny_model())


@pytest.mark.parametrize(
    ("spec", "cls"),
    [
        ("hetero:k8v4,g16,r16", "QuantizedHeteroCache"),
        ("hetero:k4v2,g16,chan", "QuantizedHeteroCache"),
        ("sparse:adakv@0.2", "SparseHeadCache"),
        ("sparse:snapkv@64", "SparseHeadCache"),
        ("unified:leankv,g16", "UnifiedLeanCache"),
        ("unified:k8v4/k4v2,ap0.02,aq1.0,g16", "UnifiedLeanCache"),
    ],
)
def test_make_leankv_caches(spec, cls):
    if not hasattr(leankv_hf, cls):
        pytest.skip(f"{cls} not exported yet")
    assert type(make_cache(spec, tiny_model())).__name__ == cls


def test_missing_leankv_cache_is_an_import_error(monkeypatch):
    monkeypatch.delattr(leankv_hf, "SparseHeadCache", raising=False)
    with pytest.raises(ImportError, match="SparseHeadCache"):
        make_cache("sparse:adakv@0.2", tiny_model())
