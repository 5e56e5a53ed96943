"""The compiled kernel's boundary refuses buffers that do not match the sizes, in Python and again in C.

Every case that would write past a buffer if a check were missing runs in a child interpreter, so a
regression shows up as a failed test rather than a corrupted heap in the test runner.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import leanseq

REPO = Path(leanseq.__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(
    not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")),
    reason="no C compiler: the compiled scan kernel cannot be built here",
)

COMMON = textwrap.dedent("""
    import ctypes, json, sys
    import torch
    from leanseq.ops import native
    native.set_enabled(True)
    assert native.available(), native.status()
    b, L, d, n, chunk = 2, 5, 4, 3, 2
    nchunks = (L + chunk - 1) // chunk

    def report(case, outcome):
        print("CASE" + json.dumps({"case": case, "outcome": outcome}), flush=True)

    def attempt(case, fn):
        try:
            fn()
        except ValueError as exc:
            report(case, "refused: " + str(exc))
        else:
            report(case, "accepted")
""")

WRAPPERS = COMMON + textwrap.dedent("""
    from leanseq.ops.selective_scan import selective_scan_step
    g = torch.Generator().manual_seed(0)
    def good():
        return dict(u=torch.randn(b, L, d, generator=g), delta=torch.rand(b, L, d, generator=g),
                    A=-torch.rand(d, n, generator=g), B=torch.randn(b, L, n, generator=g),
                    C=torch.randn(b, L, n, generator=g), D=torch.randn(d, generator=g),
                    z=torch.randn(b, L, d, generator=g), h=torch.randn(b, d, n, generator=g))
    fwd_bad = {
        "h small N": ("h", torch.zeros(b, d, n - 1)), "h small D": ("h", torch.zeros(b, d - 1, n)),
        "h large N": ("h", torch.zeros(b, d, n + 1)), "h extra row": ("h", torch.zeros(b + 1, d, n)),
        "h flat": ("h", torch.zeros(b, d * n)), "h float64": ("h", torch.zeros(b, d, n, dtype=torch.float64)),
        "A wide": ("A", -torch.rand(d, n + 1)), "A tall": ("A", -torch.rand(d + 1, n)),
        "A broadcast": ("A", -torch.rand(1, n)),
        "B short": ("B", torch.zeros(b, L, n - 1)), "C short": ("C", torch.zeros(b, L - 1, n)),
        "D long": ("D", torch.zeros(d + 1)), "z narrow": ("z", torch.zeros(b, L, d - 1)),
        "delta short": ("delta", torch.zeros(b, L - 1, d)), "u flat": ("u", torch.zeros(b, L * d)),
    }
    for case, (name, value) in fwd_bad.items():
        args = good()
        args[name] = value
        attempt("fwd " + case, lambda: native.selective_scan_fwd(**args))
    attempt("fwd negative chunk", lambda: native.selective_scan_fwd(**good(), chunk=-1))

    def bwd_args():
        a = good()
        return dict(u=a["u"], delta=a["delta"], A=a["A"], B=a["B"], C=a["C"],
                    starts=torch.zeros(b, nchunks, d, n), grad_y=torch.randn(b, L, d), grad_h=torch.randn(b, d, n),
                    chunk=chunk)
    bwd_bad = {
        "starts too few chunks": ("starts", torch.zeros(b, nchunks - 1, d, n)),
        "starts small N": ("starts", torch.zeros(b, nchunks, d, n - 1)),
        "grad_y short": ("grad_y", torch.zeros(b, L - 1, d)), "grad_h small D": ("grad_h", torch.zeros(b, d - 1, n)),
        "chunk zero": ("chunk", 0),
    }
    for case, (name, value) in bwd_bad.items():
        args = bwd_args()
        args[name] = value
        attempt("bwd " + case, lambda: native.selective_scan_bwd(**args))

    a = good()
    attempt("step state small N", lambda: selective_scan_step(
        torch.zeros(b, d, n - 1), a["u"][:, 0], a["delta"][:, 0], a["A"], a["B"][:, 0], a["C"][:, 0]))
    attempt("step state small D", lambda: selective_scan_step(
        torch.zeros(b, d - 2, n), a["u"][:, 0], a["delta"][:, 0], a["A"], a["B"][:, 0], a["C"][:, 0]))
    args = good()
    args["h"] = torch.randn(b, n, d).transpose(1, 2)  # right shape, not contiguous: copied, accepted
    attempt("fwd h transposed view", lambda: native.selective_scan_fwd(**args))
""")

RAW_C = COMMON + textwrap.dedent("""
    FWD, BWD = native._FWD_BUFFERS, native._BWD_BUFFERS
    def fwd_buffers():
        shapes = dict(u=(b, L, d), delta=(b, L, d), A=(d, n), B=(b, L, n), C=(b, L, n), D=(d,), z=(b, L, d),
                      h=(b, d, n), y=(b, L, d), starts=(b, nchunks, d, n))
        return {k: torch.full(shapes[k], 0.5 if k not in ("y", "starts") else 7.0) for k in FWD}
    def bwd_buffers():
        shapes = dict(u=(b, L, d), delta=(b, L, d), A=(d, n), B=(b, L, n), C=(b, L, n), starts=(b, nchunks, d, n),
                      grad_y=(b, L, d), grad_h=(b, d, n), du=(b, L, d), ddelta=(b, L, d), dA=(d, n),
                      dB_part=(b, L, n), dC_part=(b, L, n), dh0=(b, d, n))
        return {k: torch.full(shapes[k], 0.5) for k in BWD}

    def call(fn, names, bufs, sizes, counts=None, ncounts=None):
        ptrs = [None if bufs[k] is None else bufs[k].data_ptr() for k in names]
        counts = counts if counts is not None else [0 if bufs[k] is None else bufs[k].numel() for k in names]
        arr = (ctypes.c_int64 * len(counts))(*counts)
        return fn(*ptrs, arr, len(counts) if ncounts is None else ncounts, *sizes)

    fwd, bwd = native._lib.leanseq_selective_scan_fwd, native._lib.leanseq_selective_scan_bwd
    report("fwd valid", call(fwd, FWD, fwd_buffers(), (b, L, d, n, chunk, 0, d)))
    for i, name in enumerate(FWD):  # each buffer one element short of what the sizes need
        bufs = fwd_buffers()
        bufs[name] = bufs[name].flatten()[:-1].clone()
        outputs = {k: bufs[k].clone() for k in ("h", "y", "starts")}
        code = call(fwd, FWD, bufs, (b, L, d, n, chunk, 0, d))
        untouched = all(torch.equal(bufs[k], v) for k, v in outputs.items())
        report("fwd short " + name, [code, untouched])
    bufs = fwd_buffers()  # the sizes claim a larger state than every buffer holds
    report("fwd sizes larger", call(fwd, FWD, bufs, (b, L, d, n + 1, chunk, 0, d)))
    bufs = fwd_buffers()
    bufs["D"] = None  # an absent optional buffer must come with a count of 0
    report("fwd absent D counted", call(fwd, FWD, bufs, (b, L, d, n, chunk, 0, d),
                                        counts=[bufs[k].numel() if bufs[k] is not None else d for k in FWD]))
    bufs = fwd_buffers()
    bufs["u"] = None
    report("fwd absent u", call(fwd, FWD, bufs, (b, L, d, n, chunk, 0, d)))
    for case, sizes in {"negative length": (b, -1, d, n, chunk, 0, d), "d1 past dim": (b, L, d, n, chunk, 0, d + 1),
                        "d0 after d1": (b, L, d, n, chunk, 3, 2), "starts without chunk": (b, L, d, n, 0, 0, d),
                        "overflow": (2**40, 2**40, d, n, chunk, 0, d)}.items():
        report("fwd " + case, call(fwd, FWD, fwd_buffers(), sizes))
    report("fwd wrong ncounts", call(fwd, FWD, fwd_buffers(), (b, L, d, n, chunk, 0, d), ncounts=9))

    bufs = fwd_buffers()  # the wrapper's translation of a refusal: a ValueError naming the buffer
    bufs["h"] = bufs["h"].flatten()[:-1].clone()
    counts = native._counts([bufs[k] for k in FWD])
    args = [bufs[k].data_ptr() for k in FWD] + [counts.buffer_info()[0], len(FWD)]
    attempt("fwd refusal raised", lambda: native._run_blocks(fwd, args, (b, L, d, n, chunk), 1, 1, names=FWD))

    report("bwd valid", call(bwd, BWD, bwd_buffers(), (b, L, d, n, chunk, 0, d)))
    for i, name in enumerate(BWD):
        bufs = bwd_buffers()
        bufs[name] = bufs[name].flatten()[:-1].clone()
        report("bwd short " + name, call(bwd, BWD, bufs, (b, L, d, n, chunk, 0, d)))
    report("bwd chunk zero", call(bwd, BWD, bwd_buffers(), (b, L, d, n, 0, 0, d)))
    report("bwd d1 past dim", call(bwd, BWD, bwd_buffers(), (b, L, d, n, chunk, 0, d + 1)))
""")


def run_cases(script: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LEANSEQ_NATIVE"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    cases = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CASE"):
            entry = json.loads(line[4:])
            cases[entry["case"]] = entry["outcome"]
    return {"rc": proc.returncode, "stderr": proc.stderr[-3000:], "cases": cases}


@pytest.fixture(autouse=True)
def scan_backend():
    """Overrides the ops conftest's two-backend fixture: the cases run in a child with the kernel on."""
    yield "native"


@pytest.fixture(scope="module")
def wrapper_cases():
    return run_cases(WRAPPERS)


@pytest.fixture(scope="module")
def raw_cases():
    return run_cases(RAW_C)


def test_the_wrapper_cases_ran_without_a_crash(wrapper_cases):
    assert wrapper_cases["rc"] == 0, wrapper_cases["stderr"]


@pytest.mark.parametrize("case,names", [
    ("fwd h small N", ["h", "(2, 4, 3)", "(2, 4, 2)"]), ("fwd h small D", ["h", "(2, 4, 3)", "(2, 3, 3)"]),
    ("fwd h large N", ["h", "(2, 4, 4)"]), ("fwd h extra row", ["h", "(3, 4, 3)"]), ("fwd h flat", ["h", "(2, 12)"]),
    ("fwd h float64", ["h", "float64"]), ("fwd A wide", ["nstate=4", "(2, 5, 3)"]),
    ("fwd A tall", ["A", "(4, 3)", "(5, 3)"]), ("fwd A broadcast", ["A", "(1, 3)"]),
    ("fwd B short", ["B", "(2, 5, 2)"]), ("fwd C short", ["C", "(2, 4, 3)"]), ("fwd D long", ["D", "(5,)"]),
    ("fwd z narrow", ["z", "(2, 5, 3)"]), ("fwd delta short", ["delta", "(2, 4, 4)"]), ("fwd u flat", ["u", "(2, 20)"]),
    ("fwd negative chunk", ["chunk", "-1"]),
    ("bwd starts too few chunks", ["starts", "(2, 3, 4, 3)", "(2, 2, 4, 3)"]),
    ("bwd starts small N", ["starts", "(2, 3, 4, 2)"]), ("bwd grad_y short", ["grad_y", "(2, 4, 4)"]),
    ("bwd grad_h small D", ["grad_h", "(2, 3, 3)"]), ("bwd chunk zero", ["chunk", "0"]),
    ("step state small N", ["h", "(2, 4, 2)"]), ("step state small D", ["h", "(2, 2, 3)"]),
])
def test_the_wrapper_refuses_a_mismatched_buffer_by_name(wrapper_cases, case, names):
    outcome = wrapper_cases["cases"].get(case, "never reached (the child died before this case)")
    assert outcome.startswith("refused: "), f"{case}: {outcome}"
    for name in names:
        assert name in outcome, f"{case}: {name!r} not in {outcome!r}"


def test_the_wrapper_accepts_a_non_contiguous_state_of_the_right_shape(wrapper_cases):
    assert wrapper_cases["cases"].get("fwd h transposed view") == "accepted"


def test_the_raw_cases_ran_without_a_crash(raw_cases):
    assert raw_cases["rc"] == 0, raw_cases["stderr"]


def test_the_c_entry_points_accept_matching_buffers(raw_cases):
    assert raw_cases["cases"].get("fwd valid") == 0
    assert raw_cases["cases"].get("bwd valid") == 0


def test_the_c_forward_names_the_short_buffer_and_writes_nothing(raw_cases):
    from leanseq.ops import native

    for i, name in enumerate(native._FWD_BUFFERS):
        outcome = raw_cases["cases"].get(f"fwd short {name}")
        assert outcome == [native._BAD_BUFFER + i, True], f"{name}: {outcome}"
    assert raw_cases["cases"].get("fwd sizes larger") == native._BAD_BUFFER + native._FWD_BUFFERS.index("A")
    assert raw_cases["cases"].get("fwd absent D counted") == native._BAD_BUFFER + native._FWD_BUFFERS.index("D")
    assert raw_cases["cases"].get("fwd absent u") == native._BAD_BUFFER + native._FWD_BUFFERS.index("u")


def test_a_refusal_in_c_is_raised_as_a_value_error_naming_the_buffer(raw_cases):
    outcome = raw_cases["cases"].get("fwd refusal raised", "")
    assert outcome.startswith("refused: ") and "buffer h" in outcome, outcome


def test_the_c_backward_names_the_short_buffer(raw_cases):
    from leanseq.ops import native

    for i, name in enumerate(native._BWD_BUFFERS):
        assert raw_cases["cases"].get(f"bwd short {name}") == native._BAD_BUFFER + i, name


@pytest.mark.parametrize("case", ["fwd negative length", "fwd d1 past dim", "fwd d0 after d1", "fwd starts without chunk",
                                  "fwd overflow", "fwd wrong ncounts", "bwd chunk zero", "bwd d1 past dim"])
def test_the_c_entry_points_refuse_impossible_sizes(raw_cases, case):
    from leanseq.ops import native

    assert raw_cases["cases"].get(case) == native._BAD_SIZES, raw_cases["cases"].get(case)
