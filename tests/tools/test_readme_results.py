"""The README's results section is generated from the benchmarks' JSON (scripts/readme_results.py): it must match."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "scripts" / "readme_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_results_match_the_json():
    assert _generator().main(["--check"]) == 0, "run: python scripts/readme_results.py"


def test_quality_table_reports_change_against_float_and_provenance():
    gen = _generator()
    rows = [
        {"variant": "float", "avg_expert_bits": None, "code": 10.0, "docs": 20.0, "quotes": 30.0, "mean": 20.0},
        {"variant": "mc-2.5", "avg_expert_bits": 2.5, "code": 10.5, "docs": 21.0, "quotes": 31.5, "mean": 21.0},
    ]
    table = gen.quality_table(rows)
    assert table[3].endswith("| 21.00 | +5.00% |")
    assert table[2].endswith("| 20.00 |  |")
    line = gen.source_line({"commit": "abc123", "dirty": True, "command": "python x.py", "date": "d", "cpus": 2})
    assert "`abc123` (uncommitted changes)" in line and "`python x.py`" in line
    assert "not recorded" in gen.source_line(None)


def test_stale_readme_is_detected(tmp_path, monkeypatch):
    gen = _generator()
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{gen.BEGIN}\nold numbers\n{gen.END}\ntail\n")
    results = tmp_path / "results"
    results.mkdir()
    rows = [{"variant": "float", "avg_expert_bits": None, "code": 1.0, "docs": 2.0, "quotes": 3.0, "mean": 2.0}]
    (results / "readme-quality-mixtral.json").write_text(json.dumps(rows))
    monkeypatch.setattr(gen, "README", readme)
    monkeypatch.setattr(gen, "RESULTS", results)
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0
    text = readme.read_text()
    assert "old numbers" not in text and "| 2.00 |" in text and text.startswith("intro\n") and text.endswith("tail\n")
    assert gen.main(["--check"]) == 0
