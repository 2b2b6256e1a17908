"""Every JSON the project writes is RFC 8259: no NaN, no Infinity (JSON.parse, jq and other strict
readers reject them). Outputs of commands that other tests run already are parsed strictly there
(bench, calibrate --json, evaluate --json, predict's JSONL); here the rest, and the recorded results."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from adafocus.cli import main
from adafocus.errors import InternalError
from adafocus.files import dumps, write_json
from adafocus.model.presets import PRESETS
from conftest import strict_loads

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_strict_loads_refuses_what_python_would_accept():
    for text in ('{"a": NaN}', "[Infinity]", '{"t": [1, -Infinity]}'):
        json.loads(text)  # Python's own reader takes them ...
        with pytest.raises(ValueError, match="not JSON"):
            strict_loads(text)  # ... a strict one does not


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_recorded_results_are_strict_json(path):
    strict_loads(path.read_text(encoding="utf-8"))


def test_presets_and_flops_json_are_strict():
    runner = CliRunner()
    strict_loads(runner.invoke(main, ["presets", "--json"]).stdout)
    for name in PRESETS:
        result = runner.invoke(main, ["flops", name, "--json"])
        assert result.exit_code == 0, result.output
        strict_loads(result.stdout)


def test_manifests_are_strict_json(exported):
    for name in ("demo", "sthsth-v1-t8"):
        strict_loads((exported(name).path / "manifest.json").read_text(encoding="utf-8"))


def test_writers_refuse_non_finite_numbers_and_say_where(tmp_path):
    with pytest.raises(InternalError, match=r"/budgets/1/thresholds/2"):
        dumps({"budgets": [{}, {"thresholds": [0.5, 1.0, float("inf")]}]})
    with pytest.raises(InternalError, match="non-finite"):
        write_json(tmp_path / "x.json", {"a": float("nan")})
    assert not (tmp_path / "x.json").exists()
    assert strict_loads(dumps({"thresholds": [1e9, -1e9], "name": "ü"})) == {"thresholds": [1e9, -1e9], "name": "ü"}
