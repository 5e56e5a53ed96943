import pytest

ENV_VARS = ("LEANSEQ_ENERGY_BACKEND", "LEANSEQ_CPU_WATTS", "LEANSEQ_GRID_INTENSITY", "CUDA_VISIBLE_DEVICES")


@pytest.fixture(autouse=True)
def clean_energy_env(monkeypatch):
    # The machine running the tests must not steer them.
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


class FakeClock:
    """A clock the test advances by hand, so nothing sleeps and every figure is exact."""

    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@pytest.fixture
def clocks():
    return FakeClock(1000.0), FakeClock(5.0)  # wall, cpu
