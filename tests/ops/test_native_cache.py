"""The compiled kernel's cache is trusted only after checking: each scenario runs in a fresh interpreter.

A fresh process per case because the loader runs once per process, and because the faults guarded against
(SIGBUS from a truncated library, a planted library's constructor, a hanging compiler) must not reach the
test runner itself.
"""

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import leanseq
from leanseq.ops import native

REPO = Path(leanseq.__file__).resolve().parent.parent
SYSTEM_CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
pytestmark = pytest.mark.skipif(SYSTEM_CC is None, reason="no C compiler: the kernel cache cannot be exercised")

PROBE = textwrap.dedent("""
    import json, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from leanseq.ops import native
        available = native.available()
        status = native.status()
    works = None
    if available:
        import torch
        from leanseq.ops.selective_scan import selective_scan_reference
        g = torch.Generator().manual_seed(0)
        u, delta = torch.randn(2, 5, 8, generator=g), torch.rand(2, 5, 8, generator=g)
        A = -torch.rand(8, 4, generator=g)
        B, C = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
        y, h, _ = native.selective_scan_fwd(u, delta, A, B, C)
        y_ref, h_ref = selective_scan_reference(u, delta, A, B, C)
        works = bool(torch.allclose(y, y_ref, atol=1e-4) and torch.allclose(h, h_ref, atol=1e-4))
    print("PROBE" + json.dumps({"available": available, "status": status, "works": works,
                                "warnings": [str(w.message) for w in caught if "leanseq" in str(w.message)]}))
""")


@pytest.fixture(autouse=True)
def scan_backend():
    """Overrides the ops conftest's two-backend fixture: these tests start their own interpreters."""
    yield "subprocess"


def probe(cache: Path, timeout: float = 60, **env) -> dict:
    """Select the kernel in a fresh interpreter with LEANSEQ_CACHE=cache; returns what it reported."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("CC", "LEANSEQ_NATIVE", "LEANSEQ_CC_TIMEOUT")}
    full_env.update(PYTHONPATH=str(REPO), LEANSEQ_CACHE=str(cache), LEANSEQ_NATIVE="1", **env)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=full_env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, f"the probe died with code {proc.returncode}:\n{proc.stderr[-3000:]}"
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PROBE"))
    return json.loads(line[len("PROBE"):])


def built_library(cache: Path) -> Path:
    (lib,) = (cache / "native").glob("selective_scan-*.so")
    return lib


def compile_shared(tmp_path: Path, name: str, source: str) -> Path:
    src, out = tmp_path / f"{name}.c", tmp_path / f"{name}.so"
    src.write_text(source)
    subprocess.run([SYSTEM_CC, "-shared", "-fPIC", str(src), "-o", str(out)], check=True, capture_output=True)
    return out


def test_a_good_cache_is_reused_without_rebuilding(tmp_path):
    cache = tmp_path / "cache"
    first = probe(cache)
    assert first["available"] and first["works"], first
    lib = built_library(cache)
    before = (lib.stat().st_ino, lib.stat().st_mtime_ns)
    second = probe(cache)
    assert second["available"] and second["works"], second
    assert second["status"] == "compiled kernel in use"
    assert (lib.stat().st_ino, lib.stat().st_mtime_ns) == before


def test_a_truncated_library_is_rebuilt_not_loaded(tmp_path):
    cache = tmp_path / "cache"
    assert probe(cache)["available"]
    lib = built_library(cache)
    data = lib.read_bytes()
    lib.write_bytes(data[: len(data) // 2])  # a torn copy: the ELF header promises segments past the end
    report = probe(cache)
    assert report["available"] and report["works"], report
    assert "rebuilt" in report["status"] and "hash" in report["status"], report["status"]
    assert built_library(cache).read_bytes() != data[: len(data) // 2]


def test_a_library_without_the_kernel_symbols_is_replaced(tmp_path):
    cache = tmp_path / "cache"
    assert probe(cache)["available"]
    empty = compile_shared(tmp_path, "empty", "int leanseq_something_else = 1;\n")
    shutil.copyfile(empty, built_library(cache))
    report = probe(cache)
    assert report["available"] and report["works"], report
    assert "rebuilt" in report["status"], report["status"]


@pytest.mark.parametrize("record", ["missing", "forged"])
def test_a_planted_library_never_runs(tmp_path, record):
    cache = tmp_path / "cache"
    assert probe(cache)["available"]
    marker = tmp_path / "constructor-ran"
    planted = compile_shared(tmp_path, "planted", textwrap.dedent(f"""
        #include <stdio.h>
        __attribute__((constructor)) static void plant(void) {{
            FILE *f = fopen("{marker}", "w");
            if (f) {{ fputs("ran", f); fclose(f); }}
        }}
    """))
    target = built_library(cache)
    shutil.copyfile(planted, target)
    digest = hashlib.sha256(planted.read_bytes()).hexdigest()
    for sidecar in cache.joinpath("native").iterdir():
        if sidecar == target or not sidecar.name.startswith(target.name):
            continue
        if record == "missing":
            sidecar.unlink()
        else:  # the planter rewrites every digest in the record with the planted file's sha256
            sidecar.write_text(re.sub(r"[0-9a-f]{64}", digest, sidecar.read_text()))
    try:
        report = probe(cache)
    finally:  # checked first: a crash after the constructor ran is the lesser fault
        assert not marker.exists(), "the planted library was loaded: its constructor ran"
    assert report["available"] and report["works"], report
    assert "rebuilt" in report["status"], report["status"]


def test_a_valid_record_for_a_symbolless_library_rebuilds_once_then_falls_back(tmp_path):
    """A compiler whose output lacks the kernel's symbols: one rebuild, then the PyTorch path, reason said."""
    empty_src = tmp_path / "empty.c"
    empty_src.write_text("int leanseq_something_else = 1;\n")
    fake_cc = tmp_path / "fake-cc"
    fake_cc.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        out=""
        while [ $# -gt 0 ]; do
            if [ "$1" = "-o" ]; then out="$2"; fi
            shift
        done
        exec {SYSTEM_CC} -shared -fPIC -o "$out" {empty_src}
    """))
    fake_cc.chmod(0o755)
    report = probe(tmp_path / "cache", CC=str(fake_cc))
    assert report["available"] is False
    assert "symbol" in report["status"] and "PyTorch" in report["status"], report["status"]


@pytest.mark.parametrize("loose", ["root", "native"])
def test_a_cache_others_can_write_is_not_used(tmp_path, loose):
    cache = tmp_path / "cache"
    (cache / "native").mkdir(parents=True)
    loosened = cache if loose == "root" else cache / "native"
    loosened.chmod(0o775 if loose == "root" else 0o777)
    report = probe(cache)
    assert report["available"] and report["works"], report
    assert "temporary" in report["status"] and str(loosened) in report["status"], report["status"]
    assert any(str(loosened) in w for w in report["warnings"]), report["warnings"]
    assert list((cache / "native").iterdir()) == [], "files were written into a folder others can write to"
    assert stat.S_IMODE(loosened.stat().st_mode) & 0o022, "the loader must not silently change the user's modes"


def test_cc_with_arguments_is_split_like_make(tmp_path):
    spaced = tmp_path / "my compilers"
    spaced.mkdir()
    os.symlink(SYSTEM_CC, spaced / "cc")
    report = probe(tmp_path / "cache", CC=f"'{spaced / 'cc'}' -O2 -DLEANSEQ_UNUSED=1")
    assert report["available"] and report["works"], report


def test_a_hanging_compiler_is_stopped(tmp_path):
    pid_file = tmp_path / "sleeper.pid"
    fake_cc = tmp_path / "slow-cc"
    # the sleep runs as a child of the shell, as cc1 does under gcc: stopping the shell alone is not enough
    fake_cc.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {pid_file}\nwait\n")
    fake_cc.chmod(0o755)
    start = time.monotonic()
    report = probe(tmp_path / "cache", timeout=40, CC=str(fake_cc), LEANSEQ_CC_TIMEOUT="1")
    assert time.monotonic() - start < 30
    assert report["available"] is False
    assert "LEANSEQ_CC_TIMEOUT" in report["status"] and "1 s" in report["status"], report["status"]
    pid = int(pid_file.read_text())
    state = Path(f"/proc/{pid}/status")
    deadline = time.monotonic() + 5
    while state.exists() and "zombie" not in state.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not state.exists() or "zombie" in state.read_text(), "the compiler's child process was left running"


def test_a_bad_timeout_setting_is_named(tmp_path):
    report = probe(tmp_path / "cache", LEANSEQ_CC_TIMEOUT="soon")
    assert report["available"] is False
    assert "LEANSEQ_CC_TIMEOUT" in report["status"] and "'soon'" in report["status"], report["status"]


def test_reset_lets_a_process_select_again(tmp_path, monkeypatch):
    """The private reset helper the tests rely on: a second selection honours a changed environment."""
    monkeypatch.setenv("LEANSEQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native._reset()
    try:
        native.set_enabled(True)
        assert not native.available()
        assert "no-such-compiler" in native.status()
    finally:
        monkeypatch.undo()
        native._reset()
        native.set_enabled(None)
    assert native.available(), native.status()


def test_enabling_after_a_disabled_first_use_still_builds():
    native._reset()
    try:
        native.set_enabled(False)
        assert not native.available()
        assert native.status().startswith("disabled")
        native.set_enabled(True)
        assert native.available(), native.status()
    finally:
        native.set_enabled(None)


def test_loading_the_kernels_leaves_the_processs_floating_point_mode_alone(tmp_path):
    """Both libraries are built with -ffast-math; linking with it would add crtfastmath.o, whose constructor
    sets flush-to-zero / denormals-are-zero for the loading thread: every later float operation of the user's
    process (Python floats, numpy, torch) would then treat subnormal numbers as zero."""
    script = textwrap.dedent("""
        import numpy as np
        from leanseq.ops import decode, native
        assert native.available() and decode.library() is not None, (native.status(), decode.status())
        tiny = np.float32(1e-40)  # subnormal
        assert float(tiny * np.float32(1.0)) != 0.0, "flush-to-zero is on"
        assert 5e-324 * 1.0 != 0.0, "denormals-are-zero is on"
        print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "LEANSEQ_NATIVE")}
    env.update(PYTHONPATH=str(REPO), LEANSEQ_CACHE=str(tmp_path), LEANSEQ_NATIVE="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
