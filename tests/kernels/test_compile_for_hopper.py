"""The Triton kernels compile for the H100/H200 (sm90) on this CPU machine, down to a cubin with the ptxas that
Triton ships: the interpreter that runs the other kernel tests never compiles, so a kernel it runs can still fail
to build on a GPU (a constexpr default in a @triton.jit helper did, 2026-12-06). Each kernel is built at the
launch settings the launchers use, in a subprocess without TRITON_INTERPRET (which makes @triton.jit interpret)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from chronicals.kernels import linear_cross_entropy as lce, lora_swiglu as lsw, rms_norm, rope, swiglu

    P16 = [["tt.divisibility", 16]]  # what Triton assumes of 16-byte aligned pointers and strides at launch

    def build(fn, signature, constexprs, num_warps):
        aligned = {(i,): P16 for i, t in enumerate(signature.values()) if t.startswith("*")}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        assert kernel.asm["cubin"], fn.__name__
        # An sm90 block may hold at most 227 KiB of shared memory; more compiles, then fails at launch.
        assert kernel.metadata.shared <= 227 * 1024, (fn.__name__, constexprs, kernel.metadata.shared)
        return kernel.asm["ptx"]

    def sig(names, constexprs):
        return {n: ("constexpr" if n in constexprs else t) for n, t in names}

    bf = "*bf16"
    # (eviction, flat, wide): both L2 policies, both SwiGLU layouts and both offset widths (_utils.needs_int64); the
    # int64 build gets int64 sizes and strides, as Triton passes them once a value passes 2^31.
    for eviction, flat, wide in (("evict_first", True, False), ("", False, True)):
        i = "i64" if wide else "i32"
        # The approximate sigmoid and the bit widening (_utils.sigmoid / widen: their inline PTX must assemble), or not.
        c = {"BLOCK": 4096, "EVICTION": eviction, "FLAT": flat, "WIDE": wide, "FAST": flat, "BITS": flat}
        ptx = build(swiglu._swiglu_fwd_kernel, sig([("A", bf), ("B", bf), ("C", bf), ("n_cols", i),
                    ("col_blocks", i), ("stride_a", i), ("stride_b", i), ("stride_c", i),
                    ("BLOCK", ""), ("EVICTION", ""), ("FLAT", ""), ("WIDE", ""), ("FAST", ""), ("BITS", "")], c), c, 8)
        assert ("evict_first" in ptx) == bool(eviction)
        assert ("ex2.approx.ftz" in ptx) == ("0xFFFF0000" in ptx) == flat
        for residual in (True, False):
            c = {"HAS_RESIDUAL": residual, "BLOCK_M": 4, "BLOCK_N": 1024, "EVICTION": eviction, "WIDE": wide}
            build(rms_norm._rms_norm_fwd_kernel, sig([("X", bf), ("R", bf), ("S", bf), ("Y", bf), ("W", bf),
                  ("RSTD", "*fp32"), ("stride_x", i), ("stride_r", i), ("stride_s", i),
                  ("stride_y", i), ("n_rows", i), ("n_cols", "i32"), ("eps", "fp32"), ("offset", "fp32"),
                  ("HAS_RESIDUAL", ""), ("BLOCK_M", ""), ("BLOCK_N", ""), ("EVICTION", ""), ("WIDE", "")], c), c, 8)
    for write_c, eviction, flat, wide in ((True, "evict_first", False, False), (False, "", True, True)):
        i = "i64" if wide else "i32"
        c = {"WRITE_C": write_c, "BLOCK": 4096, "EVICTION": eviction, "FLAT": flat, "WIDE": wide, "FAST": write_c,
             "BITS": write_c}
        ptx = build(swiglu._swiglu_bwd_kernel, sig([("DC", bf), ("A", bf), ("B", bf), ("DA", bf), ("DB", bf),
                    ("C", bf), ("n_cols", i), ("col_blocks", i), ("stride_dc", i), ("stride_a", i),
                    ("stride_b", i), ("stride_da", i), ("stride_db", i), ("stride_c", i),
                    ("WRITE_C", ""), ("BLOCK", ""), ("EVICTION", ""), ("FLAT", ""), ("WIDE", ""), ("FAST", ""),
                    ("BITS", "")], c), c, 8)
        assert ("evict_first" in ptx) == bool(eviction)
        assert ("ex2.approx.ftz" in ptx) == ("0xFFFF0000" in ptx) == write_c
    for has_ds, one_col, wide in ((True, False, False), (False, False, True), (True, True, False)):
        i = "i64" if wide else "i32"
        c = {"HAS_DS": has_ds, "COMPUTE_DW": True, "BLOCK_M": 4, "BLOCK_N": 16 if one_col else 1024, "NUM_STAGES": 2,
             "ONE_COL": one_col, "WIDE": wide}
        build(rms_norm._rms_norm_bwd_kernel, sig([("DY", bf), ("DS", bf), ("X", bf), ("W", bf), ("RSTD", "*fp32"),
              ("DX", bf), ("DW_PARTIAL", "*fp32"), ("stride_dy", i), ("stride_ds", i), ("stride_x", i),
              ("stride_dx", i), ("n_rows", i), ("n_cols", "i32"), ("n_tiles", "i32"), ("offset", "fp32"),
              ("eps", "fp32"), ("HAS_DS", ""), ("COMPUTE_DW", ""), ("BLOCK_M", ""), ("BLOCK_N", ""),
              ("NUM_STAGES", ""), ("ONE_COL", ""), ("WIDE", "")], c), c, 8)
    # RoPE at Qwen2.5-0.5B's heads (14 q / 2 kv of 64): HF's dense head views (outputs strided alike) with a position
    # table and int32 offsets, and strided heads with per-position cos/sin and int64 offsets, forward and backward;
    # bf16 widened by bit moves (_utils.widen: its inline PTX must assemble) and by the compiler's cvt.
    for dense, has_pos, wide, backward in ((True, True, False, False), (False, False, True, True)):
        i = "i64" if wide else "i32"
        strides = [(f"s{t}_{d}", i) for t in ("q", "k", "qo", "ko") for d in "bhs"]
        strides += [(f"s{t}_{d}", i) for t in ("cos", "sin", "pos") for d in "bs"]
        c = {"N_Q_HEADS": 14, "N_K_HEADS": 2, "HALF": 32, "DENSE_HEADS": dense, "HALF_TABLE": True,
             "HAS_POS": has_pos, "BACKWARD": backward, "POS_PER_PROG": 2, "BLOCK_HQ": 16, "BLOCK_HK": 2,
             "BLOCK_HALF": 32, "EVICTION": "", "WIDE": wide, "OUT_LIKE_IN": dense, "BITS": dense}
        ptx = build(rope._qk_rope_kernel, sig([(n, bf) for n in ("Q", "K", "QO", "KO")]
                    + [("COS", bf if dense else "*fp32"), ("SIN", bf if dense else "*fp32"),
                       ("POS", "*i64" if has_pos else "*fp32")] + strides
                    + [("seq_len", "i32")] + [(n, "") for n in c], c), c, 4)
        assert ("0xFFFF0000" in ptx) == dense
    # head_dim 2 (half a row is one element) with one head per block: the widening's tensors hold a single bf16, which
    # a packed pair (pack=2) cannot take, so widen must fall back to the cvt there (an H100 failed to build it).
    strides = [(f"s{t}_{d}", "i32") for t in ("q", "k", "qo", "ko") for d in "bhs"]
    strides += [(f"s{t}_{d}", "i32") for t in ("cos", "sin", "pos") for d in "bs"]
    c = {"N_Q_HEADS": 1, "N_K_HEADS": 1, "HALF": 1, "DENSE_HEADS": True, "HALF_TABLE": True, "HAS_POS": True,
         "BACKWARD": False, "POS_PER_PROG": 1, "BLOCK_HQ": 1, "BLOCK_HK": 1, "BLOCK_HALF": 1, "EVICTION": "",
         "WIDE": False, "OUT_LIKE_IN": True, "BITS": True}
    build(rope._qk_rope_kernel, sig([(n, bf) for n in ("Q", "K", "QO", "KO", "COS", "SIN")] + [("POS", "*i64")]
          + strides + [("seq_len", "i32")] + [(n, "") for n in c], c), c, 1)
    for bias, softcap, smoothing in ((False, False, False), (True, True, True)):
        c = {"HAS_BIAS": bias, "HAS_SOFTCAP": softcap, "BLOCK_V": 4096, "HAS_SMOOTHING": smoothing}
        build(lce._block_lse_kernel, sig([("logits_ptr", bf), ("stride_row", "i32"), ("bias_ptr", bf),
              ("labels_ptr", "*i64"), ("max_ptr", "*fp32"), ("sumexp_ptr", "*fp32"), ("target_ptr", "*fp32"),
              ("v_start", "i32"), ("n_cols", "i32"), ("softcap", "fp32"), ("on_label", "fp32"),
              ("per_column", "fp32"), ("HAS_BIAS", ""), ("HAS_SOFTCAP", ""), ("BLOCK_V", ""), ("HAS_SMOOTHING", "")],
              c), c, 16)
        c = {**c, "ROUND_BF16": False}
        build(lce._block_grad_kernel, sig([("logits_ptr", bf), ("stride_row", "i32"), ("bias_ptr", bf),
              ("labels_ptr", "*i64"), ("lse_ptr", "*fp32"), ("row_grad_ptr", "*fp32"), ("v_start", "i32"),
              ("n_cols", "i32"), ("softcap", "fp32"), ("z_loss_weight", "fp32"), ("on_label", "fp32"),
              ("per_column", "fp32"), ("HAS_BIAS", ""), ("HAS_SOFTCAP", ""), ("BLOCK_V", ""), ("ROUND_BF16", ""),
              ("HAS_SMOOTHING", "")], c), c, 16)
    c = {"BLOCK_P": 64, "BLOCK_N": 32}
    build(rms_norm._dw_reduce_kernel, sig([("PARTIAL", "*fp32"), ("DW", bf), ("n_partials", "i32"),
          ("n_cols", "i32"), ("BLOCK_P", ""), ("BLOCK_N", "")], c), c, 4)
    # The LoRA SwiGLU kernels at both rank blocks the fused MLP sends them (ranks 1-16 and 17-32), in bf16 and
    # fp32 (tl.dot on fp32 operands is another instruction); timed on a GPU at rank 16 only.
    for dt in (bf, "*fp32"):
        for rank in (16, 32):
            c = {"RG": rank, "RU": rank, "RD": rank, "BLOCK_M": lsw._BLOCK_M, "BLOCK_N": lsw._BLOCK_N,
                 "UPCAST": False, "FAST": True}
            scalars = [("off_g", "i32"), ("off_u", "i32"), ("r_g", "i32"), ("r_u", "i32"), ("r_d", "i32"),
                       ("s_g", "fp32"), ("s_u", "fp32"), ("RG", ""), ("RU", ""), ("RD", ""), ("BLOCK_M", ""),
                       ("BLOCK_N", ""), ("UPCAST", ""), ("FAST", "")]
            # FAST takes the approximate sigmoid for bf16 activations only: fp32 keeps tl.sigmoid (_utils.sigmoid).
            ptx = build(lsw._lora_swiglu_fwd_kernel, sig([(n, dt) for n in ("E", "G", "XA", "BG", "BU", "AD", "H",
                                                                            "HA")]
                        + [(n, "i32") for n in ("n_rows", "n_cols", "stride_e", "stride_g", "stride_xa", "stride_h",
                                                "stride_ha")] + scalars, c), c, lsw._NUM_WARPS)
            assert ("ex2.approx.ftz" in ptx) == (dt == bf)
            ptx = build(lsw._lora_swiglu_bwd_kernel, sig([(n, dt) for n in ("DH", "E", "G", "XA", "BG", "BU", "GD",
                                                                            "AD", "GS")]
                        + [(n, "i32") for n in ("n_rows", "n_cols", "stride_dh", "stride_e", "stride_g", "stride_xa",
                                                "stride_gd", "stride_gs")] + scalars, c), c, lsw._NUM_WARPS)
            assert ("ex2.approx.ftz" in ptx) == (dt == bf)
    print("compiled")
""")


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's bundled ptxas is a Linux x86-64/aarch64 binary")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
