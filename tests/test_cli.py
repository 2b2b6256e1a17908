import json

from click.testing import CliRunner

from adafocus.cli import main


def test_presets_lists_every_preset_and_alias():
    result = CliRunner().invoke(main, ["presets"])
    assert result.exit_code == 0, result.output
    assert "sthsth-v1-t12" in result.output and "demo" in result.output
    assert "sthsth-v1 = sthsth-v1-t12" in result.output
    data = json.loads(CliRunner().invoke(main, ["presets", "--json"]).stdout)
    assert {p["name"] for p in data["presets"]} >= {"activitynet-p96", "diving48-t16", "demo"}


def test_flops_json_has_the_agreed_keys():
    result = CliRunner().invoke(main, ["flops", "sthsth-v1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"glance", "policy", "cube", "exit_cumulative", "dense_baseline"} <= set(data)
    assert len(data["exit_cumulative"]) == 3
    assert 34.4 < data["dense_baseline"] < 35.8


def test_flops_table_and_unknown_preset():
    result = CliRunner().invoke(main, ["flops", "demo"])
    assert result.exit_code == 0 and "exit after 4 cubes" in result.output
    bad = CliRunner().invoke(main, ["flops", "kinetics400"])
    assert bad.exit_code == 1
    assert "unknown preset 'kinetics400'" in bad.output and "Traceback" not in bad.output
