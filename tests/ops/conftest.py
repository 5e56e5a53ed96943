import os
import shutil

import pytest

from leanseq.ops import native


@pytest.fixture(params=["native", "torch"], autouse=True)
def scan_backend(request):
    """Every ops test runs twice: with the compiled CPU kernel and with the pure-PyTorch path."""
    if request.param == "native" and not native.available():
        if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
            pytest.skip("no C compiler: the compiled scan kernel cannot be built here")
        pytest.fail(f"the compiled scan kernel did not build: {native.status()}")
    native.set_enabled(request.param == "native")
    yield request.param
    native.set_enabled(None)
