"""Compile every Triton kernel of sami_fast for Hopper (sm_90) without a GPU.

The interpreter that runs the kernels on CPU accepts programs a real compile
rejects (constexpr misuse, tl.dot shapes, dtype mismatches), so this lowers each
kernel through Triton's full NVIDIA pipeline (TTIR -> PTX -> cubin with the
bundled ptxas) at representative configurations. It must run without
TRITON_INTERPRET. Prints one line per kernel configuration; exits 1 on failure.
"""

import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import sami_fast.kernels.linear_logprobs as linear  # noqa: E402
import sami_fast.kernels.logits_logprobs as logits  # noqa: E402
import sami_fast.kernels.mi_loss as mi  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


def spilled_bytes(ptx: str) -> int:
    """Bytes of register spill stores ptxas reports for the kernel (its -v resource report)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        report = subprocess.run(
            [get_ptxas(HOPPER.arch).path, "-v", "--gpu-name", "sm_90a", source,
             "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report))


def jit_function(kernel):
    """Unwrap @autotune / @heuristics down to the @triton.jit function."""
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def compile_kernel(kernel, signature, constexprs, num_warps=4, num_stages=3):
    fn = jit_function(kernel)
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})


def linear_logprobs_configs():
    # (name, pointer dtype, DOT_FP32, TF32): fp32 runs exact (ieee) dots, or TF32 tensor
    # cores when torch allows TF32 for fp32 matmuls.
    for name, dtype, dot_fp32, tf32 in (("bf16", "bf16", False, False), ("fp16", "fp16", False, False),
                                        ("fp32", "fp32", True, False), ("fp32 tf32", "fp32", True, True)):
        wants_tensor_cores = not dot_fp32 or tf32
        flags = {"DOT_FP32": dot_fp32, "TF32": tf32}
        forward = {
            "rows_ptr": f"*{dtype}", "row_index_ptr": "*i64", "weight_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}",
            "targets_ptr": "*i64", "partial_lse_ptr": "*fp32", "target_logit_ptr": "*fp32", "M": "i32", "V": "i32",
            "D": "i32", "stride_row": "i32", "stride_weight": "i32", "softcap": "fp32", "inv_temperature": "fp32",
            "n_splits": "i32",
        }
        for config in linear.FORWARD_CONFIGS:
            yield (f"linear_logprobs forward {name} {config.kwargs}", linear._linear_logprobs_kernel, forward,
                   {"HAS_BIAS": True, "HAS_SOFTCAP": True, "EVEN_D": False, **flags, **config.kwargs},
                   config.num_warps, config.num_stages, wants_tensor_cores)
        backward = {
            "rows_ptr": f"*{dtype}", "row_index_ptr": "*i64", "weight_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}",
            "targets_ptr": "*i64", "lse_ptr": "*fp32", "grad_ptr": "*fp32", "d_rows_ptr": "*fp32",
            "d_weight_ptr": "*fp32", "d_bias_ptr": "*fp32", "M": "i32", "V": "i32", "D": "i32", "vocab_start": "i32",
            "stride_row": "i32", "stride_weight": "i32", "softcap": "fp32", "inv_temperature": "fp32",
        }
        for config in linear.BACKWARD_CONFIGS:
            yield (f"linear_logprobs backward {name} {config.kwargs}", linear._linear_logprobs_backward_kernel,
                   backward, {"HAS_BIAS": True, "HAS_SOFTCAP": True, "EVEN_D": True, **flags,
                              "HAS_D_ROWS": True, "HAS_D_WEIGHT": True, "HAS_D_BIAS": True, **config.kwargs},
                   config.num_warps, config.num_stages, wants_tensor_cores)


def logits_logprobs_configs():
    for dtype in ("bf16", "fp32"):
        yield (f"logits_logprobs forward {dtype}", logits._logits_logprobs_forward_kernel,
               {"logits_ptr": f"*{dtype}", "targets_ptr": "*i64", "lse_ptr": "*fp32", "out_ptr": "*fp32",
                "stride_row": "i64", "V": "i32", "ignore_index": "i64"},
               {"BLOCK_V": 4096, "EVEN_V": False}, 8, 1, False)
        yield (f"logits_logprobs backward {dtype}", logits._logits_logprobs_backward_kernel,
               {"logits_ptr": f"*{dtype}", "targets_ptr": "*i64", "lse_ptr": "*fp32", "grad_out_ptr": "*fp32",
                "grad_logits_ptr": f"*{dtype}", "stride_row": "i64", "stride_grad_row": "i64", "V": "i32",
                "ignore_index": "i64"},
               {"BLOCK_V": 4096, "EVEN_V": False}, 8, 1, False)


def mi_loss_configs():
    for dtype in ("bf16", "fp32"):
        for block, single, has_mask in ((16, True, False), (64, True, True), (64, False, True)):
            yield (f"mi_loss {dtype} BLOCK={block} single_tile={single} mask={has_mask}", mi._mi_loss_kernel,
                   {"x_ptr": f"*{dtype}", "mask_ptr": "*u8" if has_mask else "constexpr",
                    "num_queries_ptr": "*i64" if has_mask else "constexpr", "grad_ptr": f"*{dtype}", "out_ptr": "*fp32",
                    "scratch_ptr": "constexpr" if single else "*fp32", "C": "i32",
                    "stride_xb": "i32", "stride_xr": "i32", "stride_xc": "i32",
                    "stride_mb": "i32", "stride_mr": "i32", "stride_mc": "i32"},
                   {"BLOCK": block, "HAS_MASK": has_mask, "STORE_GRAD": True, "SINGLE_TILE": single,
                    "EVEN_C": False, **({} if has_mask else {"mask_ptr": None, "num_queries_ptr": None}),
                    **({"scratch_ptr": None} if single else {})},
                   mi.tile_warps(block), 1, False)


def main() -> int:
    failures = 0
    for name, kernel, signature, constexprs, num_warps, num_stages, wants_wgmma in (
        *linear_logprobs_configs(), *logits_logprobs_configs(), *mi_loss_configs()
    ):
        try:
            compiled = compile_kernel(kernel, signature, constexprs, num_warps, num_stages)
            ptx = compiled.asm["ptx"]
            if wants_wgmma and "wgmma" not in ptx:
                raise AssertionError("tl.dot did not lower to Hopper wgmma (tensor cores)")
            spills = spilled_bytes(ptx)
            print(f"ok    {name}: {compiled.metadata.shared} B shared memory, {spills} B spilled")
        except Exception as exc:  # report every configuration, then fail
            failures += 1
            print(f"FAIL  {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
