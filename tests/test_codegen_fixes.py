"""Our fixes to Inductor's Triton code generation (``_torch_compat.CODEGEN_FIXES``).

The defect they fix needs a GPU to show (a race between warps), so these tests check the
mechanism on any machine: which stores get a barrier, that the patch is in place only while
we compile, and that cache keys name the fixes (an artifact cached without them is not reused).
"""

from types import SimpleNamespace

from torch._inductor.codegen.triton import TritonKernel

from fx_optim_pass import _torch_compat as compat


def kernel(inside_reduction: bool, inplace: tuple[str, ...]) -> SimpleNamespace:
    return SimpleNamespace(
        inside_reduction=inside_reduction, args=SimpleNamespace(inplace_buffers={n: object() for n in inplace})
    )


def test_barrier_only_before_in_place_stores_inside_a_reduction():
    # The H200 defect: an in_out_ptr loaded and stored inside the reduction loop of the
    # bias-gradient kernel, one warp storing before another loaded (triton-lang/triton#1615).
    assert compat.needs_barrier_before_store(kernel(True, ("buf0",)), "buf0")
    assert not compat.needs_barrier_before_store(kernel(True, ("buf0",)), "buf1")  # not in place
    assert not compat.needs_barrier_before_store(kernel(False, ("buf0",)), "buf0")  # pointwise: safe
    assert not compat.needs_barrier_before_store(SimpleNamespace(args=SimpleNamespace(inplace_buffers={})), "b")


def test_store_is_patched_only_while_compiling_and_never_twice():
    original = TritonKernel.__dict__["store"]
    with compat.barrier_before_inplace_stores_in_reductions():
        patched = TritonKernel.__dict__["store"]
        assert patched is not original and patched._fx_optim_patch
        with compat.barrier_before_inplace_stores_in_reductions():  # nested: left as it is
            assert TritonKernel.__dict__["store"] is patched
        assert TritonKernel.__dict__["store"] is patched
    assert TritonKernel.__dict__["store"] is original


def test_cache_key_names_the_codegen_fixes():
    class Ours(compat.CustomGraphPass):
        def __call__(self, graph):
            pass

        def uuid(self):
            return "ours"

    assert compat._ChainedPass(None, Ours()).uuid() == (None, "ours", compat.CODEGEN_FIXES)
    assert "inplace-store-barrier-in-reductions" in compat.CODEGEN_FIXES
