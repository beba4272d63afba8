"""Ahead-of-time compile checks of every Triton kernel in kernels/ for sm_80 (A100) and sm_90 (H100), no GPU needed.

For every launch the wrappers can make (dtypes, head dims, causal or not, every autotune candidate the
wrapper would keep for that architecture), compiled with the ptxas that ships in the triton wheel:
- it compiles (Triton -> PTX -> cubin);
- its shared memory fits the architecture's per-block limit;
- ptxas reports no register spills;
- on sm_90 each kernel whose main tl.dot Triton can lower to Hopper's wgmma does so; the others say why not;
- the Hopper forward copies tiles with TMA (cp.async.bulk.tensor) and runs exponentials while a wgmma group is
  in flight (between its commit and its wait), which the sm_80 forward on sm_90 does not.

How. Triton's launch binder specializes example arguments exactly as a launch would (16-byte pointer alignment,
ints divisible by 16, i32 or i64), then triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)).
This pytest process runs the other kernel tests under TRITON_INTERPRET=1 (tests/conftest.py), where
@triton.jit builds interpreter functions, so kernel modules are imported afresh in spawned worker processes
with TRITON_INTERPRET=0, TRITON_ALWAYS_COMPILE=1 and a fresh cache directory: nothing cached across runs can
hide a failure, and the interpreter tests in this process are untouched.

By default each kernel compiles every configuration its wrapper can choose with the most demanding launch of
that configuration (the largest head dim that shares it, bf16 for both half types, causal for flash); the full
cross product (fp16 as well, head dims 16 and 32, non-causal, all epilogues) runs with
NANOSTACK_COMPILE_ALL=1 (about 10x longer).

Adding a kernel file: write a function `def _my_launches(module, arch): yield Launch(...)` covering every
configuration its wrapper can choose (arguments as the launcher passes them, by parameter name: a torch dtype
stands for a tensor of that dtype; `config` is the meta-parameters plus num_warps and num_stages; `full_only`
marks launches only the full run compiles; `no_wgmma` says why the main dot cannot use wgmma, or None), then
append KernelCheck("kernels.my_file", "_my_kernel", _my_launches) to KERNELS. test_every_kernel_is_checked
fails until every `*_kernel` in kernels/ has an entry.
"""

import concurrent.futures
import contextlib
import dataclasses
import io
import multiprocessing
import os
import re

import pytest
import torch

pytestmark = pytest.mark.slow

ARCHS = (80, 90)
# Per-block shared memory limits (opt-in maximum): A100 163 KB, H100 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
COMPILE_ALL = os.environ.get("NANOSTACK_COMPILE_ALL") == "1"
TOKENS, HEADS, KV_HEADS = 4096, 32, 8  # a (tokens, heads, D) packed batch with GQA, as the model launches


@dataclasses.dataclass
class Launch:
    """One compile: a kernel's arguments by parameter name, the meta-parameters, and what to expect."""
    label: str
    args: dict
    config: dict  # meta-parameters, num_warps, num_stages
    full_only: bool = False
    no_wgmma: str | None = None  # why the main tl.dot cannot lower to wgmma on sm_90 (None: it must)


@dataclasses.dataclass(frozen=True)
class KernelCheck:
    """A kernel in kernels/ and the generator of every launch its wrapper can make, per architecture."""
    module: str
    kernel: str
    launches: object  # (module, arch) -> iterable of Launch
    hopper_pipeline: bool = False  # also check TMA copies and a wgmma in flight during exp2 (sm_90 only)
    archs: tuple = ARCHS

    @property
    def name(self):
        return f"{self.module.split('.')[-1]}.{self.kernel}"


def _packed(heads, head_dim, prefix):
    """The stride arguments of a packed (tokens, heads, head_dim) tensor, named as the flash kernels name them."""
    return {f"stride_{prefix}t": heads * head_dim, f"stride_{prefix}h": head_dim}


def _flash_launches(module, arch, kind):
    """The sm_80-path flash kernels: every head dim and dtype (tiles by kernel_blocks), causal or not."""
    for head_dim in module.SUPPORTED_HEAD_DIMS:
        for dtype in module.SUPPORTED_DTYPES:
            for causal in (True, False):
                block_m, block_n, warps, stages = module.kernel_blocks(kind, head_dim, dtype)
                args = dict(cu_seqlens_q=torch.int32, cu_seqlens_k=torch.int32, Lse=torch.float32,
                            stride_lse_h=TOKENS, qk_scale=0.18, GROUP_SIZE=HEADS // KV_HEADS, HEAD_DIM=head_dim,
                            CAUSAL=causal)
                for name, heads in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS), ("o", HEADS), ("do", HEADS),
                                    ("dq", HEADS), ("dk", KV_HEADS), ("dv", KV_HEADS)):
                    args.update(_packed(heads, head_dim, name))
                for name in ("Q", "K", "V", "Out", "dOut", "dQ", "dK", "dV"):
                    args[name] = dtype
                args.update(Delta=torch.float32, stride_delta_h=TOKENS, softmax_scale=0.125)
                # The main dots' M is the block of rows the program holds: keys for dK/dV, queries otherwise.
                rows = block_n if kind == "dkdv" else block_m
                yield Launch(f"{kind} D={head_dim} {str(dtype)[6:]} causal={causal}", args,
                             dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages),
                             full_only=head_dim < 64 or dtype == torch.float16 or not causal,
                             no_wgmma=None if rows >= 64 else f"{rows}-row blocks: wgmma needs 64 rows per warpgroup")


def _flash_delta_launches(module, arch):
    for head_dim in module.SUPPORTED_HEAD_DIMS:
        for dtype in module.SUPPORTED_DTYPES:
            args = dict(Out=dtype, dOut=dtype, Delta=torch.float32, total_q=TOKENS, stride_delta_h=TOKENS,
                        HEAD_DIM=head_dim, **_packed(HEADS, head_dim, "o"), **_packed(HEADS, head_dim, "do"))
            yield Launch(f"delta D={head_dim} {str(dtype)[6:]}", args, dict(BLOCK_M=64, num_warps=4, num_stages=3),
                         full_only=head_dim < 128 or dtype != torch.bfloat16, no_wgmma="no tl.dot (a row sum)")


def _hopper_launches(module, arch):
    from triton.runtime.jit import MockTensor
    from triton.tools.tensor_descriptor import TensorDescriptor
    for head_dim, (block_m, block_n, warps, stages) in module.HOPPER_BLOCKS.items():
        for dtype in module.HOPPER_DTYPES:
            for causal in (True, False):
                def rows(heads, block):
                    return TensorDescriptor(MockTensor(dtype, [TOKENS, heads, head_dim]), [TOKENS, heads * head_dim],
                                            [heads * head_dim, 1], [block, head_dim])
                args = dict(desc_q=rows(HEADS, block_m), desc_k=rows(KV_HEADS, block_n), desc_v=rows(KV_HEADS, block_n),
                            Out=dtype, Lse=torch.float32, cu_seqlens_q=torch.int32, cu_seqlens_k=torch.int32,
                            stride_ot=HEADS * head_dim, stride_oh=head_dim, stride_lse_h=TOKENS, qk_scale=0.18,
                            GROUP_SIZE=HEADS // KV_HEADS, HEAD_DIM=head_dim, CAUSAL=causal)
                yield Launch(f"hopper D={head_dim} {str(dtype)[6:]} causal={causal}", args,
                             dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages),
                             full_only=head_dim == 16 or dtype == torch.float16 or not causal)


def _paged_launches(module, arch):
    from kernels.int8_matmul import dot_dtype_and_precision
    block_size, group_size, max_blocks, splits = 16, HEADS // KV_HEADS, 256, 8
    for head_dim in (64, 128, 256):
        head_dim_pad = module._next_power_of_2(head_dim, 16)
        for dtype in module.SUPPORTED_DTYPES:
            for split in (True, False):
                dot_dtype, dot_precision = dot_dtype_and_precision(dtype)
                kv = dict(stride_kb=block_size * KV_HEADS * head_dim, stride_kt=KV_HEADS * head_dim, stride_kh=head_dim)
                args = dict(Q=dtype, KCache=dtype, VCache=dtype, BlockTables=torch.int32, ContextLens=torch.int32,
                            Out=dtype, PartialOut=torch.float32, PartialLse=torch.float32, stride_lens=1,
                            stride_qs=HEADS * head_dim, stride_qh=head_dim, **kv,
                            **{name.replace("_k", "_v"): value for name, value in kv.items()},
                            stride_table_s=max_blocks, stride_table_b=1, stride_os=HEADS * head_dim, stride_oh=head_dim,
                            stride_part_s=HEADS * splits * head_dim, stride_part_h=splits * head_dim,
                            stride_part_split=head_dim, stride_lse_s=HEADS * splits, stride_lse_h=splits,
                            qk_scale=0.18, GROUP_SIZE=group_size, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
                            QUERY_ROWS=module._next_power_of_2(group_size, 16), KV_BLOCK_SIZE=block_size,
                            SPLIT=split, DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision)
                yield Launch(f"paged D={head_dim} {str(dtype)[6:]} split={split}", args,
                             module.kernel_config(head_dim_pad, dtype),
                             full_only=dtype == torch.float16 or not split or (head_dim, dtype) == (64, torch.bfloat16),
                             no_wgmma="16 query rows (a GQA group, padded): wgmma needs 64 rows per warpgroup, and "
                                      "decode is bound by reading K/V, not by the dot")


def _merge_launches(module, arch):
    for head_dim in (64, 128, 256):
        args = dict(PartialOut=torch.float32, PartialLse=torch.float32, Out=torch.bfloat16, num_splits=8,
                    stride_part_s=HEADS * 8 * head_dim, stride_part_h=8 * head_dim, stride_part_split=head_dim,
                    stride_lse_s=HEADS * 8, stride_lse_h=8, stride_os=HEADS * head_dim, stride_oh=head_dim,
                    HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim, SPLITS_PAD=32)
        yield Launch(f"merge D={head_dim}", args, dict(num_warps=4, num_stages=3), full_only=head_dim != 128,
                     no_wgmma="no tl.dot (a weighted sum)")


def _write_kv_launches(module, arch):
    # One token's K (or V) row is n_kv_head * head_dim values: 8 x 128 as the model launches, and a padded 8 x 96.
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        for row in (1024, 768):
            args = dict(K=dtype, V=dtype, KCache=dtype, VCache=dtype, SlotMapping=torch.int32, stride_k=row,
                        stride_v=row, ROW=row, ROW_PAD=1024)  # triton.next_power_of_2(row), as the launcher
            yield Launch(f"write_kv {dtype} row={row}", args, dict(num_warps=4, num_stages=3),
                         full_only=dtype == torch.float16 or row != 1024, no_wgmma="no tl.dot (a copy)")


def _matmul_no_wgmma(config):
    """Why a matmul tile cannot use wgmma, or None."""
    if config.kwargs["BLOCK_M"] < 64:
        return "BLOCK_M < 64: a warpgroup's wgmma covers 64 rows; small-M (decode) tiles use mma.sync, and they " \
               "are bound by reading the weights anyway"
    return None


def _int8_launches(module, arch):
    for has_scales, out_dtype in ((True, torch.bfloat16), (True, torch.float32), (True, torch.float16),
                                  (False, torch.int32)):
        for config in module.configs_for_arch(module._int8_matmul_kernel.configs, arch):
            args = dict(A=torch.int8, B=torch.int8, C=out_dtype, AScale=torch.float32, BScale=torch.float32,
                        M=TOKENS, N=TOKENS, K=TOKENS, M_BUCKET=TOKENS, stride_am=TOKENS, stride_ak=1,
                        stride_bn=TOKENS, stride_bk=1, stride_cm=TOKENS, stride_cn=1, HAS_SCALES=has_scales)
            yield Launch(f"int8 {str(out_dtype)[6:]} {_config_label(config)}", args, _config_dict(config),
                         full_only=out_dtype != torch.bfloat16, no_wgmma=_matmul_no_wgmma(config))


def _w8a16_launches(module, arch):
    for dtype in module.ACTIVATION_DTYPES:
        dot_dtype, dot_precision = module.dot_dtype_and_precision(dtype)
        for has_bias in (False, True):
            for config in module.configs_for_arch(module._w8a16_matmul_kernel.configs, arch, dtype):
                args = dict(X=dtype, W=torch.int8, WScale=torch.float32, Bias=dtype, C=dtype, M=TOKENS, N=TOKENS,
                            K=TOKENS, M_BUCKET=TOKENS, stride_xm=TOKENS, stride_xk=1, stride_wn=TOKENS, stride_wk=1,
                            stride_cm=TOKENS, stride_cn=1, stride_bias=1, HAS_BIAS=has_bias, DOT_DTYPE=dot_dtype,
                            DOT_PRECISION=dot_precision)
                yield Launch(f"w8a16 {str(dtype)[6:]} bias={has_bias} {_config_label(config)}", args,
                             _config_dict(config), full_only=dtype == torch.float16 or not has_bias,
                             no_wgmma=_matmul_no_wgmma(config))


def _w4a16_launches(module, arch):
    N, K = 14336, 4096  # a Llama-3-8B MLP projection
    for dtype in module.KERNEL_DTYPES:
        dot_dtype, dot_precision = module.dot_dtype_and_precision(dtype)
        for group_size in (32, 128):
            block_k = min(group_size, module.MAX_BLOCK_K)
            for has_bias, split_k in ((False, 1), (True, 1), (False, 8)):
                for config in module._w4a16_matmul_kernel.configs:
                    args = dict(X=dtype, W=torch.uint8, Scale=dtype, Zero=torch.uint8, Bias=dtype,
                                C=dtype if split_k == 1 else torch.float32, M=TOKENS, N=N, K=K, M_BUCKET=TOKENS,
                                SPLIT_K=split_k, stride_xm=K, stride_xk=1, stride_wn=K // 2, stride_wk=1,
                                stride_sn=K // group_size, stride_sg=1, stride_ck=TOKENS * N, stride_cm=N,
                                stride_cn=1, GROUP_SIZE=group_size, BLOCK_K=block_k, HAS_BIAS=has_bias,
                                DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision)
                    tile = "x".join(str(config.kwargs[name]) for name in ("BLOCK_M", "BLOCK_N"))
                    label = (f"w4a16 {str(dtype)[6:]} G={group_size} bias={has_bias} split={split_k} {tile} "
                             f"warps {config.num_warps} stages {config.num_stages}")
                    yield Launch(label, args, _config_dict(config),
                                 full_only=dtype == torch.float16 or has_bias or group_size == 32,
                                 no_wgmma=_matmul_no_wgmma(config))


def _sum_splits_launches(module, arch):
    for dtype, has_bias in ((torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, True)):
        args = dict(P=torch.float32, Bias=dtype, C=dtype, N=14336, SPLIT_K=8, TOTAL=16 * 14336, HAS_BIAS=has_bias,
                    BLOCK=module.SUM_BLOCK)
        yield Launch(f"sum splits {str(dtype)[6:]} bias={has_bias}", args, dict(num_warps=4, num_stages=3),
                     full_only=dtype == torch.float16, no_wgmma="no tl.dot (a sum over splits)")


def _config_dict(config):
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _config_label(config):
    tile = "x".join(str(config.kwargs[name]) for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return f"{tile} group {config.kwargs['GROUP_M']} warps {config.num_warps} stages {config.num_stages}"


def _flash(kind):
    return lambda module, arch: _flash_launches(module, arch, kind)


KERNELS = [
    KernelCheck("kernels.flash_attention", "_attn_fwd_kernel", _flash("fwd")),
    KernelCheck("kernels.flash_attention", "_attn_bwd_dkdv_kernel", _flash("dkdv")),
    KernelCheck("kernels.flash_attention", "_attn_bwd_dq_kernel", _flash("dq")),
    KernelCheck("kernels.flash_attention", "_attn_bwd_delta_kernel", _flash_delta_launches),
    KernelCheck("kernels.flash_attention_hopper", "_hopper_fwd_kernel", _hopper_launches, hopper_pipeline=True,
                archs=(90,)),
    KernelCheck("kernels.paged_attention", "_paged_decode_kernel", _paged_launches),
    KernelCheck("kernels.paged_attention", "_merge_splits_kernel", _merge_launches),
    KernelCheck("kernels.paged_attention", "_write_kv_kernel", _write_kv_launches),
    KernelCheck("kernels.int8_matmul", "_int8_matmul_kernel", _int8_launches),
    KernelCheck("kernels.int8_matmul", "_w8a16_matmul_kernel", _w8a16_launches),
    KernelCheck("kernels.int4_matmul", "_w4a16_matmul_kernel", _w4a16_launches),
    KernelCheck("kernels.int4_matmul", "_sum_splits_kernel", _sum_splits_launches),
]
CHECKS = {check.name: check for check in KERNELS}


# ---- worker side: runs in spawned processes with the interpreter off ----

def _worker_setup(cache_dir):
    """Compile for real (not the interpreter) and never read a cached kernel (its ptxas log would be missing).
    FP fusion stays on, as by default at launch; setting it only silences Triton 3.9's warning about the default."""
    os.environ.update(TRITON_INTERPRET="0", TRITON_ALWAYS_COMPILE="1", TRITON_CACHE_DIR=cache_dir,
                      TRITON_DEFAULT_FP_FUSION="1")


def _launches(check, arch):
    import importlib
    module = importlib.import_module(check.module)
    if module.INTERPRET:
        raise RuntimeError(f"{check.module} was imported with TRITON_INTERPRET=1: nothing would be compiled")
    return module, [launch for launch in check.launches(module, arch) if COMPILE_ALL or not launch.full_only]


def _list_jobs():
    """Every (check name, arch, launch index, label, no_wgmma), and the `*_kernel` names found in kernels/."""
    import importlib
    import pkgutil

    import kernels
    jobs = [(check.name, arch, index, launch.label, launch.no_wgmma)
            for check in KERNELS for arch in check.archs for index, launch in enumerate(_launches(check, arch)[1])]
    found = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"kernels.{info.name}")
        found.update(f"{info.name}.{name}" for name in vars(module) if name.endswith("_kernel")
                     and hasattr(getattr(module, name), "run"))
    return jobs, found


def _compile(check_name, arch, index):
    """Compile one launch; returns what the checks read (or the error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    check = CHECKS[check_name]
    module, launches = _launches(check, arch)
    launch = launches[index]
    kernel = getattr(module, check.kernel)
    jit = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    # The launch builders share argument dicts across kernels of a file: each kernel takes the names it declares.
    arguments = {name: MockTensor.wrap_dtype(value) for name, value in {**launch.args, **launch.config}.items()
                 if name in jit.arg_names or name in ("num_warps", "num_stages")}
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed by the backend
    log = io.StringIO()
    try:
        bound, specialization, options = binder(**arguments)
        options, signature, constexprs, attrs = jit._pack_args(backend, arguments, bound, specialization, options)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as error:  # the check reports it; one failed compile must not hide the others
        return dict(error=f"{type(error).__name__}: {str(error)[-1500:]}")
    ptx = compiled.asm["ptx"]
    ptxas = log.getvalue()
    return dict(shared=compiled.metadata.shared,
                spilled=sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas)),
                registers=max((int(n) for n in re.findall(r"Used (\d+) registers", ptxas)), default=None),
                wgmma=ptx.count("wgmma.mma_async"), tma=ptx.count("cp.async.bulk.tensor"),
                exp2_during_wgmma=exp2_during_wgmma(ptx), ptxas_ran="registers" in ptxas)


def exp2_during_wgmma(ptx: str) -> int:
    """ex2 instructions issued between a wgmma.commit_group and the next wgmma.wait_group: exponentials computed
    while a tensor-core group is in flight (in program order, which is what a loop body executes)."""
    in_flight, count = False, 0
    for line in ptx.splitlines():
        if "wgmma.commit_group" in line:
            in_flight = True
        elif "wgmma.wait_group" in line:
            in_flight = False
        elif in_flight and "ex2.approx" in line:
            count += 1
    return count


# ---- test side ----

@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{check name: [(arch, label, no_wgmma, result)]} for every launch, compiled in a process pool."""
    cache_dir = str(tmp_path_factory.mktemp("triton_cache"))
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1), mp_context=context,
                                                initializer=_worker_setup, initargs=(cache_dir,)) as pool:
        jobs, found = pool.submit(_list_jobs).result()
        # The longest compiles (flash backward, the Hopper forward) first, so no worker is left with them at the end.
        order = sorted(jobs, key=lambda job: not job[0].startswith(("flash_attention.", "flash_attention_hopper")))
        futures = [(job, pool.submit(_compile, job[0], job[1], job[2])) for job in order]
        results = {}
        for (name, arch, _, label, no_wgmma), future in futures:
            results.setdefault(name, []).append((arch, label, no_wgmma, future.result()))
    print(f"\ncompiled {len(jobs)} kernel/configuration pairs" + (" (NANOSTACK_COMPILE_ALL=1)" if COMPILE_ALL else ""))
    return results, found


@pytest.mark.parametrize("name", CHECKS)
def test_compiles_fits_shared_memory_and_does_not_spill(compiled, name):
    results, _ = compiled
    assert results.get(name), f"{name}: no launches compiled"
    problems = []
    for arch, label, _, result in results[name]:
        if "error" in result:
            problems.append(f"sm_{arch} {label}: {result['error']}")
            continue
        assert result["ptxas_ran"], f"sm_{arch} {label}: no ptxas log to read spills from"
        if result["shared"] > SHARED_LIMIT[arch]:
            problems.append(f"sm_{arch} {label}: {result['shared']} bytes of shared memory > {SHARED_LIMIT[arch]}")
        if result["spilled"]:
            problems.append(f"sm_{arch} {label}: {result['spilled']} bytes of register spills "
                            f"({result['registers']} registers)")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", CHECKS)
def test_main_dot_lowers_to_wgmma_on_sm90(compiled, name):
    results, _ = compiled
    missing = [label for arch, label, no_wgmma, result in results[name]
               if arch == 90 and no_wgmma is None and "error" not in result and result["wgmma"] == 0]
    assert not missing, f"no wgmma in: {missing}"


@pytest.mark.parametrize("name", [name for name, check in CHECKS.items() if check.hopper_pipeline])
def test_hopper_pipeline_has_tma_and_exponentials_during_wgmma(compiled, name):
    results, _ = compiled
    hopper = [(label, result) for _, label, _, result in results[name]]
    assert hopper and all(result["tma"] > 0 and result["exp2_during_wgmma"] > 0 for _, result in hopper), hopper
    # The check can fail: the sm_80 forward compiled for sm_90 waits for every wgmma before its softmax.
    plain = [result for arch, _, _, result in results["flash_attention._attn_fwd_kernel"] if arch == 90]
    assert plain and all(result["exp2_during_wgmma"] == 0 and result["tma"] == 0 for result in plain)


def test_every_kernel_is_checked(compiled):
    _, found = compiled
    assert found == set(CHECKS), f"kernels without a KernelCheck entry: {sorted(found - set(CHECKS))}"


def test_exp2_during_wgmma_counts_only_exponentials_in_flight():
    ptx = "\n".join(["ex2.approx.f32 a;", "wgmma.commit_group.sync.aligned;", "ex2.approx.f32 b;",
                     "ex2.approx.ftz.f32 c;", "wgmma.wait_group.sync.aligned 0;", "ex2.approx.f32 d;"])
    assert exp2_during_wgmma(ptx) == 2
