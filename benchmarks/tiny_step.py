"""How long one model.step takes on the bundled ~66K-parameter demo Mamba, and where the time goes.

    python benchmarks/tiny_step.py              # best of 5 x 2000 steps per part
    python benchmarks/tiny_step.py --steps 500  # quicker

Process CPU time (time.process_time), one torch thread, under torch.no_grad, each step fed the state the
previous one returned (the vouched fast path). Parts are timed alternately in one process, so a busy machine
slows them all alike; the best repeat of each counts. Eager vs native are measured in the same run.
Not part of make test.
"""

from __future__ import annotations

import argparse
import array
import importlib.resources
import time

import torch

import leanseq
from leanseq.ops import decode


def best_us(fn, steps: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        for _ in range(steps):
            fn()
        best = min(best, (time.process_time() - t) / steps)
    return best * 1e6


def _compiled_call(model, tok, state):
    """The kernel call try_step makes, with its arguments packed once (what is left of a step without Python)."""
    plan = model._native_decode_plan
    head = plan.layouts[1][4]  # the packed arguments up to the batch size (decode._batch_layout)
    out = [torch.empty_like(t) for t in (state.conv, state.ssm, state.position)] + [torch.empty(1, model.vocab_size)]
    args = array.array("q", (*head, tok.data_ptr(), 1, state.conv.data_ptr(), state.ssm.data_ptr(), out[0].data_ptr(),
                             out[1].data_ptr(), state.position.data_ptr(), out[2].data_ptr(), out[3].data_ptr(),
                             plan.scratch.data_ptr(), 1))
    fn, address = decode._lib.leanseq_ssm_decode_packed, args.buffer_info()[0]

    keep = (args, out)  # the memory the packed pointers point at lives as long as this closure

    def call():
        if fn(address, decode._PACKED_LEN) != 0 or keep is None:
            raise RuntimeError("the kernel refused its arguments")

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = leanseq.load(str(importlib.resources.files("leanseq") / "data" / "induction-mamba"))
    n, steps, repeats = model.num_parameters(), args.steps, args.repeats
    tok = torch.tensor([3])
    with torch.no_grad():
        decode.set_enabled(True)
        _, state = model.step(tok, model.init_state(1))  # plan built, state vouched
        box = {"s": state}

        def native_step():
            _, box["s"] = model.step(tok, box["s"])

        outside = state.clone()  # an equal state the model did not return: validated in full every step
        call = _compiled_call(model, tok, state)
        parts = {
            "model.step (native, vouched state)": native_step,
            "model.step (native, unvouched state)": lambda: model.step(tok, outside),
            "  check_input_ids (range left to C)": lambda: model.check_input_ids(tok, 1, "token_ids", False),
            "  check_state (vouched)": lambda: model.check_state(state, 1),
            "  check_state (unvouched, full)": lambda: model.check_state(outside, 1, check_values=True),
            "  _native_step": lambda: model._native_step(tok, state),
            "    the compiled call alone (ctypes + C)": call,
            "  plan_for": lambda: decode.plan_for(model),
            "  _vouch": lambda: state._vouch(model),
            "  model.dtype": lambda: model.dtype,
        }
        times = {name: float("inf") for name in parts}
        for _ in range(repeats):  # alternate: one repeat of each part per round
            for name, fn in parts.items():
                times[name] = min(times[name], best_us(fn, steps, 1))
        decode.set_enabled(False)
        eager_state = {"s": model.init_state(1)}

        def eager_step():
            _, eager_state["s"] = model.step(tok, eager_state["s"])

        eager = best_us(eager_step, max(50, steps // 20), repeats)
        decode.set_enabled(None)
    print(f"tiny demo Mamba ({n:,} parameters), batch 1, 1 thread, CPU time per step, best of {repeats} x {steps}")
    for name, us in times.items():
        print(f"  {name:40s} {us:8.2f} us")
    native = times["model.step (native, vouched state)"]
    print(f"  {'model.step (eager)':40s} {eager:8.2f} us")
    print(f"total: native {native:.1f} us/step vs eager {eager:.1f} us/step ({eager / native:.1f}x)")


if __name__ == "__main__":
    main()
