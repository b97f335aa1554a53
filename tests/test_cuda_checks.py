"""How CUDA ops report bad values (knnfast.ops.settings, csrc/common/settings.h): per call
("auto" outside loops, "sync"), deferred to one check per loop (``deferred_checks``: the
decoding loops' mode, no host sync per step, CUDA graphs), or never ("off"). The mode logic
runs everywhere; the CUDA tests run where a GPU and a CUDA build exist."""
import subprocess
import sys

import pytest
import torch

import knnfast
from knnfast.ops import settings

CUDA = torch.cuda.is_available() and knnfast.build_info().get("cuda_compiled", False)
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a GPU and a CUDA build of knnfast")


@pytest.fixture(autouse=True)
def default_mode():
    before = settings.configure("cuda_checks", "auto")
    yield
    settings.configure("cuda_checks", before)


def _cpp_mode():
    """The C++ setting (0 off, 1 per call, 2 deferred), read by setting it to itself."""
    value = torch.ops.knnfast.configure("cuda_checks", 1)
    torch.ops.knnfast.configure("cuda_checks", value)
    return value


def test_modes_map_to_the_cpp_setting():
    for mode, cpp in (("off", 0), ("sync", 1), ("auto", 1), ("deferred", 2)):
        settings.configure("cuda_checks", mode)
        assert _cpp_mode() == cpp, mode
    assert settings.configure("cuda_checks", True) == "deferred" and _cpp_mode() == 1
    assert settings.configure("cuda_checks", False) == "auto" and _cpp_mode() == 0


def test_deferred_checks_defer_only_the_auto_mode_and_nest():
    with settings.deferred_checks():
        assert _cpp_mode() == 2
        with settings.deferred_checks():
            assert _cpp_mode() == 2
        assert _cpp_mode() == 2                   # the outer loop is still running
    assert _cpp_mode() == 1
    for mode, inside in (("sync", 1), ("off", 0), ("deferred", 2)):
        settings.configure("cuda_checks", mode)
        with settings.deferred_checks():
            assert _cpp_mode() == inside, mode    # "sync" is the debug mode: loops too
        assert _cpp_mode() == settings.CUDA_CHECKS[mode]


def test_an_error_inside_leaves_the_mode_restored():
    with pytest.raises(KeyError):
        with settings.deferred_checks():
            raise KeyError("the block's own error")
    assert _cpp_mode() == 1 and settings.configure("cuda_checks", "auto") == "auto"


def test_bad_values_are_named():
    with pytest.raises(ValueError, match=r"cuda_checks must be one of \('off', 'sync', 'auto', "
                       r"'deferred'\)"):
        settings.configure("cuda_checks", "later")
    with pytest.raises(ValueError, match=r"cuda_checks must be in \[0, 2\], got 3"):
        torch.ops.knnfast.configure("cuda_checks", 3)
    with pytest.raises(ValueError, match=r"debug must be in \[0, 1\], got 2"):
        torch.ops.knnfast.configure("debug", 2)


@pytest.mark.parametrize("raw,mode", [("1", "auto"), ("0", "off"), ("sync", "sync"),
                                      ("DEFERRED", "deferred"), ("", "auto")])
def test_environment_names_the_mode(raw, mode):
    code = "from knnfast.ops import settings; print(settings.configure('cuda_checks', 'auto'))"
    env = dict(__import__("os").environ, KNNFAST_CUDA_CHECKS=raw)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == [mode]


def test_a_bad_environment_value_is_named():
    env = dict(__import__("os").environ, KNNFAST_CUDA_CHECKS="maybe")
    run = subprocess.run([sys.executable, "-c", "import knnfast"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "KNNFAST_CUDA_CHECKS must be one of" in run.stderr


def test_check_without_cuda_is_a_no_op():
    assert settings.take_cuda_status() == [] or CUDA
    settings.check_cuda_errors()


# --------------------------------------------------------------------------- on a GPU

def _bad_interpolate(device):
    logits = torch.randn(2, 10, device=device)
    tokens = torch.tensor([[1, 99], [2, 3]], device=device)      # 99 >= V = 10
    return knnfast.knn_interpolate(logits, tokens, scores=torch.zeros(2, 2, device=device),
                                   temperature=1.0, lam=0.5)


@needs_cuda
def test_deferred_bad_value_raises_on_leaving_the_loop():
    with pytest.raises(ValueError, match="tokens with an id outside their range.*first at "
                       "flat position 1"):
        with settings.deferred_checks():
            _bad_interpolate("cuda")              # no error at the call
    settings.check_cuda_errors()                  # cleared by the check that raised
    with pytest.raises(ValueError, match="tokens must lie in"):
        _bad_interpolate("cuda")                  # outside a loop: at the call, as on CPU
    settings.configure("cuda_checks", "sync")
    with pytest.raises(ValueError, match="tokens must lie in"):
        with settings.deferred_checks():
            _bad_interpolate("cuda")              # the debug mode raises at the call


@needs_cuda
@pytest.mark.parametrize("rows", [8, 64])          # 64: the tensor-core plan and its proof
def test_a_decoding_step_never_syncs_and_runs_in_a_cuda_graph(tmp_path, rows):
    g = torch.Generator().manual_seed(0)
    n, d, v = 4096, 64, 500
    with knnfast.Datastore.create(str(tmp_path / "ds"), d, torch.float16, v,
                                  progress=False) as w:
        w.add(torch.randn(n, d, generator=g), torch.randint(0, v, (n,), generator=g))
    ds = knnfast.Datastore.open(str(tmp_path / "ds")).to("cuda")
    knn = knnfast.KNNDecoder(ds, k=8, temperature=10.0, lam=0.5)
    hidden = torch.randn(rows, d, generator=g).cuda()
    logits = torch.randn(rows, v, generator=g).cuda()
    eager = knn(hidden, logits)                    # per-call checks: the reference result
    with settings.deferred_checks():
        torch.cuda.set_sync_debug_mode("error")    # any host sync in the step raises
        try:
            step = knn(hidden, logits)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(step, eager)
    out = torch.empty_like(eager)
    with settings.deferred_checks():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            knn(hidden, logits, out=out)           # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            knn(hidden, logits, out=out)
        hidden.copy_(hidden.flip(0))
        logits.copy_(logits.flip(0))
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(out, knn(hidden, logits))
