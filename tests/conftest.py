"""Shared test settings: hypothesis profiles, the tolerance table, and CPU Triton.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here,
before test modules import mohdify.codegen. Tests run kernels under the interpreter on CPU.
"""

import logging
import os

if not os.environ.get("MOHDIFY_TEST_CUDA"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# pytest (>= 8) attaches its log-capture handlers to every logger that does not propagate, so torch's
# structured-trace logger gains handlers and builds its payloads (graphs, guards, tensor metadata) at
# every compile: ~10-15% of the CPU time of the compile-heavy tests. Propagating, it has no handler of its
# own once torch's lazy handler removes itself, and torch skips the payloads (its records still reach the
# root logger's capture). Set here, before pytest's session handlers attach, and before each test
# (torch._logging.set_logs() resets it).
_TRACE_LOG = logging.getLogger("torch.__trace")
_TRACE_LOG.propagate = True


@pytest.fixture(autouse=True)
def _no_structured_trace_payloads():
    _TRACE_LOG.propagate = True
    for handler in [h for h in _TRACE_LOG.handlers if type(h).__module__.startswith("_pytest")]:
        _TRACE_LOG.removeHandler(handler)
    yield


settings.register_profile("ci", deadline=None, max_examples=8, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("dev", deadline=None, max_examples=30, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# One tolerance table: (atol, rtol) relative to the output scale; fp32 tight. Low-precision
# dtypes are compared against plain torch's own error at that dtype (see assert_close_to).
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, dtype=None) -> None:
    """Max abs error <= atol * max(1, |expected|.max()): the spec's 'relative to the output scale'."""
    dtype = dtype or expected.dtype
    atol, _ = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual.float() - expected.float()).abs().max().item() if expected.numel() else 0.0
    assert err <= atol * scale, (f"{what}: shape {tuple(expected.shape)} {dtype}: max abs error {err:.3e} > "
                                 f"{atol:.0e} x output scale {scale:.3e}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _thread_count_restored():
    """Examples, benchmarks and the CLI run in-process set torch's thread count; later tests get it back.
    torch.compile guards on the calling thread's count, and a new thread starts at the default, so a
    changed count made every thread of the threading tests recompile (CI: 5 graphs where 1 was built)."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture
def fresh_dynamo():
    """Compile tests start and end with empty dynamo caches and mohdify counters."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    """Tests marked `interpreter` run Triton kernels on CPU tensors: they need TRITON_INTERPRET=1 and
    are skipped in a GPU run (MOHDIFY_TEST_CUDA=1, interpreter off), so that
    `MOHDIFY_TEST_CUDA=1 pytest tests/codegen` runs the CUDA tests alone."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    skip = pytest.mark.skip(reason="runs Triton on CPU tensors; needs TRITON_INTERPRET=1 (unset MOHDIFY_TEST_CUDA)")
    for item in items:
        if item.get_closest_marker("interpreter"):
            item.add_marker(skip)
