"""Text files are UTF-8 whatever the locale: Triton's Python stub runs its interpreter in the C
locale, where `open()` without an encoding reads ASCII (and the export's manifest holds "²", "×")."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adafocus.export.manifest import MANIFEST, ManifestEncodingError

ROOT = Path(__file__).resolve().parents[1]
TEXT_OPENERS = {"open", "read_text", "write_text", "fdopen"}


def unspecified_encodings(path: Path) -> list[str]:
    """Calls in `path` that open a file as text without naming its encoding."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name not in TEXT_OPENERS or any(k.arg == "encoding" for k in node.keywords):
            continue
        if name == "open" and isinstance(func, ast.Attribute) and getattr(func.value, "id", "") not in ("io", "os"):
            continue  # av.open, tarfile.open, ...: not text files
        if name in ("open", "fdopen"):
            mode = next(
                (k.value for k in node.keywords if k.arg == "mode"), node.args[1] if len(node.args) > 1 else None
            )
            if isinstance(mode, ast.Constant) and "b" in str(mode.value):
                continue
        found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_every_text_file_names_its_encoding():
    files = [p for folder in ("src", "tests", "benchmarks", "scripts") for p in (ROOT / folder).rglob("*.py")]
    assert len(files) > 50
    offenders = [line for path in files for line in unspecified_encodings(path)]
    assert offenders == [], "name encoding='utf-8':\n" + "\n".join(offenders)


def test_the_scan_finds_what_it_looks_for(tmp_path):
    sample = tmp_path / "sample.py"
    lines = ['open("a")', 'open("a", "rb")', 'Path("a").read_text(encoding="utf-8")', 'x.write_text("t")', "av.open(f)"]
    sample.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert [line.split(":")[1] for line in unspecified_encodings(sample)] == ["1", "4"]


C_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}


def test_an_export_is_changed_opened_and_run_in_the_c_locale(exported, tmp_path):
    target = shutil.copytree(exported("demo").path, tmp_path / "demo")
    script = f"""
import locale, numpy as np
assert locale.getpreferredencoding(False) in ("ANSI_X3.4-1968", "ascii", "US-ASCII"), locale.getpreferredencoding(False)
from adafocus.export.manifest import open_export, update_manifest
from adafocus.runtime import Runtime
update_manifest({str(target)!r}, lambda m: m["weights"].update(note="écrit en UTF-8 ²×"))
export = open_export({str(target)!r})
assert export.weights["note"] == "écrit en UTF-8 ²×" and "²" in export.preset.description
runtime = Runtime.load(export.path)
print(runtime.predict(np.zeros((2, *runtime.preset.video_shape), np.float32)).exit_step.tolist())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONUTF8"))} | C_LOCALE
    (tmp_path / "probe.py").write_text(script, encoding="utf-8")  # a source file is UTF-8 in any locale
    done = subprocess.run(
        [sys.executable, "-X", "utf8=0", tmp_path / "probe.py"], env=env, capture_output=True, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    assert done.stdout.strip().startswith(b"[")


def test_a_manifest_that_is_not_utf8_is_an_error_and_the_cache_stays(exported, tmp_path, monkeypatch):
    from adafocus import builtin
    from adafocus.export.manifest import sha256_file
    from adafocus.weights import builtin_checkpoint

    monkeypatch.setenv("ADAFOCUS_CACHE", str(tmp_path / "cache"))
    cached = builtin._cached(f"demo-{sha256_file(builtin_checkpoint())[:12]}")
    shutil.copytree(exported("demo").path, cached)
    damaged = b"\xff\xfe" + (cached / MANIFEST).read_bytes()
    (cached / MANIFEST).write_bytes(damaged)
    with pytest.raises(ManifestEncodingError, match="(?s)is not UTF-8 text.*nothing was changed or deleted"):
        builtin.demo_export(log=lambda _: None)
    assert (cached / MANIFEST).read_bytes() == damaged  # not rebuilt, not deleted
