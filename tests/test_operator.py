"""The operator's first hour (issue 16): commands start fast (no torch/ray for --help, ls, inspect), and an
encode's terminal carries audioarc's own lines only; Ray's go to a log file the summary names."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import audio_factory as af
from tests.content import spectrogram_similarity

ROOT = Path(__file__).resolve().parents[1]

# runs the CLI as `python -m pipeline.cli ARGS`, then reports which heavy modules it imported
WRAPPER = """
import os, runpy, sys
err = os.fdopen(os.dup(2), "w")  # the terminal's stderr, even where the CLI sends file descriptor 2 to Ray's log
sys.argv = ["audioarc", *sys.argv[1:]]
try:
    runpy.run_module("pipeline.cli", run_name="__main__")
except SystemExit as e:
    code = e.code
print("IMPORTED:" + ",".join(m for m in ("torch", "ray", "ray.data", "matplotlib", "pandas") if m in sys.modules),
      file=err)
"""
# a line Ray writes itself: its log prefixes (Python "2026-01-01 10:00:00,123\tWARNING", C++ "[2026-... E ...]")
# and the lines issue 16 saw on every encode
RAY_LINE = re.compile(r"^\[?\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d|core_worker\.cc|\(raylet\)|Token authentication|"
                      r"Progress bars disabled|streaming_executor|Data sink", re.M)


def _env(tmp: Path) -> dict:
    env = dict(os.environ, AUDIOARC_LOG_DIR=str(tmp / "logs"), OMP_NUM_THREADS="1")
    for k in ("RAY_ADDRESS", "AUDIOARC_RAY_LOGS"):  # a fresh local node, as an operator's first encode gets
        env.pop(k, None)
    return env


def _imports(args: list[str], env: dict) -> tuple[set[str], subprocess.CompletedProcess]:
    r = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("IMPORTED:")][-1]
    return {m for m in line[len("IMPORTED:"):].split(",") if m}, r


@pytest.fixture(scope="module")
def quiet_encode(tmp_path_factory):
    """`audioarc encode` as an operator runs it (own process, own local Ray node, no terminal)."""
    root = tmp_path_factory.mktemp("op")
    for i in range(3):
        af.write(root / f"src/m{i}.wav", 1.5, 24000, kind="chirp", seed=i)
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "encode", str(root / "src"), str(root / "arc"),
                        "--quality-sample", "0", "--window-seconds", "1", "--actors", "1"],
                       capture_output=True, text=True, env=_env(root), cwd=ROOT, timeout=600)
    return root, r


def test_help_imports_neither_torch_nor_ray(tmp_path):
    mods, r = _imports(["--help"], _env(tmp_path))
    assert "usage: audioarc" in r.stdout
    assert not mods & {"torch", "ray", "matplotlib"}, mods
    mods, r = _imports(["encode", "--help"], _env(tmp_path))
    assert "--verbose" in r.stdout and "--quality-min-files" in r.stdout
    assert not mods & {"torch", "ray"}, mods


def test_encode_terminal_has_no_ray_log_lines(quiet_encode):
    root, r = quiet_encode
    assert r.returncode == 0, r.stderr[-3000:]
    assert not RAY_LINE.search(r.stderr), f"Ray's own lines reached the terminal:\n{r.stderr}"
    assert r.stderr.strip() == "", r.stderr  # no progress bar off a terminal, no warnings: nothing at all
    m = re.search(r"^ray log: (.+)$", r.stdout, re.M)
    assert m, r.stdout
    log = Path(m.group(1))
    assert log.parent == root / "logs"
    text = log.read_text()
    assert "execution finished" in text  # ... they are in the log file the summary names


def test_ls_and_inspect_of_an_archive_start_without_torch_or_ray(quiet_encode):
    root, r = quiet_encode
    assert r.returncode == 0, r.stderr[-3000:]
    for cmd in ("ls", "inspect"):
        mods, out = _imports([cmd, str(root / "arc")], _env(root))
        assert out.returncode == 0, out.stderr[-2000:]
        assert ("m0.wav" if cmd == "ls" else "neural_rvq") in out.stdout
        assert not mods & {"torch", "ray", "pandas"}, (cmd, mods)
    mods, out = _imports(["codecs"], _env(root))  # loads the codecs (torch), but no Ray
    assert "neural_rvq" in out.stdout and "ray" not in mods


def test_restore_of_a_few_files_needs_neither_ray_nor_pandas(quiet_encode):
    """Restoring one file is a small process: no Ray start-up, and pyarrow's optional pandas (~45 MiB) kept out."""
    import soundfile as sf
    root, r = quiet_encode
    assert r.returncode == 0, r.stderr[-3000:]
    mods, out = _imports(["restore", str(root / "arc"), str(root / "one"), "m1.wav"], _env(root))
    assert out.returncode == 0, out.stderr[-2000:]
    assert not mods & {"ray", "pandas"}, mods
    got, rate = sf.read(root / "one" / "m1.flac")
    want, _ = sf.read(root / "src" / "m1.wav")
    assert rate == 24000 and got.shape == want.shape
    # the chirp came back (at 6 kbps its log spectrogram scores ~0.5; silence 0, noise or a sine ~0)
    assert spectrogram_similarity(want, got, rate) > 0.3


def test_pandas_is_kept_out_until_ray_starts():
    code = ("import sys\n"
            "from pipeline.runtime import keep_pandas_out, _let_pandas_in\n"
            "keep_pandas_out()\n"
            "import pyarrow as pa, pyarrow.compute as pc\n"
            "assert pc.equal(pa.array(['a', 'b']), 'a').to_pylist() == [True, False]\n"
            "assert 'pandas' not in sys.modules\n"
            "try:\n    import pandas\nexcept ModuleNotFoundError:\n    pass\nelse:\n    raise SystemExit('pandas imported')\n"
            "_let_pandas_in()\n"
            "import pandas\n"
            "print('ok', pandas.__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok pandas", r.stderr[-2000:]
