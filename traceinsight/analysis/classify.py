"""Name-based classification rules shared by the analyses.

Each rule is a regular expression over names that come out of traces: kernel names,
CUDA API names, CPU-sample frames, OS-runtime calls, Python functions, framework ops and
annotation names (the MoE phase of a range: :func:`phase_class`).
They live in one place so that users can extend them (``--comm-pattern``) and so that every
analysis agrees on what "a communication kernel" or "an allocation" is.
"""

from __future__ import annotations

import functools
import re

import polars as pl

# The communication kernel patterns are a default of Options, kept in its module, so that a
# question answered from the findings cache does not compile this module's patterns.
from traceinsight.analysis.options import DEFAULT_COMM_PATTERNS

#: CUDA API calls during which the host thread waits for the GPU.
HOST_SYNC_API = re.compile(
    r"^(?:cuda(?:Stream|Device|Event|Ctx|Thread)Synchronize|cu(?:Stream|Ctx|Event)Synchronize"
    r"|cudaStreamQuery|cudaMemcpy|cudaMemcpy2D|cudaMemcpyFromSymbol|cuMemcpyDtoH(?:_v2)?"
    r"|cudaMemcpyDtoH|hip(?:Stream|Device|Event)Synchronize|hipMemcpy)$"
)

#: API calls that put work on the GPU (for launch counts).
LAUNCH_API = re.compile(
    r"^(?:cuda(?:LaunchKernel\w*|LaunchCooperativeKernel\w*|GraphLaunch|Memcpy\w*Async|Memset\w*Async)"
    r"|cu(?:LaunchKernel\w*|LaunchCooperativeKernel\w*|GraphLaunch|Memcpy\w*Async|Memset\w*Async)"
    r"|hip(?:LaunchKernel|ExtLaunchKernel|ModuleLaunchKernel|GraphLaunch|Memcpy\w*Async))$"
)

#: Causes of a CPU gap, in the order they are tried on a stack (innermost frame first).
#: ``host_sync`` is not read from stacks: it is a gap that follows a synchronizing call
#: which drained the GPU queue (:mod:`traceinsight.analysis.analyzers.cpu_gap_causes`).
GAP_CAUSES = (
    "garbage_collection",
    "module_loading",
    "cuda_allocator",
    "memory_allocation",
    "io",
    "blocked",
    "cpu_compute",
    "launch_overhead",
    "python",
    "host_sync",
    "unknown",
)

_CAUSE_PATTERNS: tuple[tuple[str, str], ...] = (
    (
        "garbage_collection",
        (
            r"(?i)gc_collect|_PyGC_|collect_generations|deduce_unreachable|subtract_refs"
            r"|move_unreachable|visit_decref|visit_reachable|gc\.collect|method collect of module"
            # CPython calls these only while collecting: untrack_dicts/untrack_tuples.
            r"|_Py(?:Dict|Tuple)_MaybeUntrack|untrack_(?:dicts|tuples)|gc_list_\w+|update_refs"
            # tp_traverse callbacks and their helpers run only when the collector walks objects
            r"|PyObject_IS_GC|_PyObject_VisitManagedDict|^\w+_traverse$"
            r"|function collect\b|\bgc_collect_main|handle_weakrefs|finalize_garbage"
        ),
    ),
    (
        # Loading GPU code: CUDA's lazy loading on a kernel's first launch, JIT compilation.
        "module_loading",
        (
            r"(?i)^cu(?:Library(?:Load\w*|GetKernel|GetModule)|Module(?:Load\w*|GetFunction))(?:_v\d+)?$"
            r"|^__cudaRegisterFatBinary|cudaGetFuncBySymbol|nvrtc\w+|nvJitLink|\bptxas\b|fatbinary|libnvrtc"
        ),
    ),
    (
        # The device allocator: the caching allocator going to the driver (cudaMalloc after a
        # cache miss or torch.cuda.empty_cache, cudaFree, pinned-host allocations).
        "cuda_allocator",
        (
            r"(?i)^cu(?:da)?(?:Malloc\w*|Free\w*|MemAlloc\w*|MemFree\w*|MemCreate|MemRelease|MemMap|MemUnmap"
            r"|MemAddressReserve|MemAddressFree|MemSetAccess|HostAlloc|MallocHost|FreeHost|HostRegister"
            r"|HostUnregister|MemHostAlloc\w*|MemFreeHost|MemHostRegister\w*)(?:_v\d+)?$"
            r"|CUDACachingAllocator|CachingHostAllocator|emptyCache|empty_cache|release_cached_blocks"
            r"|release_available_cached_blocks|garbage_collect_cached_blocks|alloc_block|free_cached_blocks"
            r"|ExpandableSegment|hipMalloc|hipFree"
        ),
    ),
    (
        "memory_allocation",
        (
            r"(?i)^(?:__libc_)?(?:malloc|calloc|realloc|free|posix_memalign|aligned_alloc|memalign|cfree)$"
            r"|^(?:__)?(?:mmap|mmap64|munmap|mremap|brk|sbrk|madvise)$|_int_malloc|_int_free|sysmalloc"
            r"|malloc_consolidate|page_fault|do_anonymous_page|handle_mm_fault|clear_page|alloc_pages"
            r"|do_huge_pmd|do_user_addr_fault|exc_page_fault|get_page_from_freelist|rmqueue|zap_pte_range"
            r"|unmap_page_range|release_pages|free_pages|__memcg_\w+|mem_cgroup_charge"
            r"|PyDataMem_|npy_alloc|PyArray_(?:Zeros|Empty|New\w*|Fill\w*|AssignRawScalar)"
            # numpy creating and filling a fresh array (np.ones/np.full/np.zeros touch pages)
            r"|raw_array_assign_scalar|array_(?:zeros|empty|ones|full)|_aligned_strided_to_contig"
            r"|numpy\.(?:zeros|ones|empty|full)|method (?:zeros|ones|empty|full) of module numpy"
            # Python frames of array creation (Kineto with_stack: ``numpy/_core/numeric.py(190): ones``)
            r"|\.py\(\d+\): (?:ones|zeros|empty|full)(?:_like)?$|built-in method (?:zeros|ones|empty|full)\b"
            r"|\bbytearray\b|PyByteArray_|PyBytes_FromStringAndSize"
            r"|^aten::(?:empty|zeros|ones|full)$|^\[memory\]$|__memset|memset_erms|__memcpy"
        ),
    ),
    (
        # File I/O on the thread: checkpoint and log writes, reads of data files.
        "io",
        (
            r"(?i)^(?:__)?(?:write|pwrite(?:64)?|writev|pwritev\d?|fsync|fdatasync|sync_file_range|syncfs"
            r"|read|pread(?:64)?|readv|preadv\d?|open|open64|openat|openat64|fopen|fopen64|fclose|fflush"
            r"|fwrite|fread|sendfile|copy_file_range|fallocate|ftruncate|io_submit|io_getevents|__close)$"
            r"|ext4_\w+|xfs_\w+|vfs_(?:write|read|fsync)|\bfile_write_iter|blkdev_\w+"
            r"|method (?:write|flush|read) of '_io\.|_io\.\w+\.(?:write|flush|read)|torch\.save|torch/serialization\.py"
        ),
    ),
    (
        "blocked",
        (
            r"(?i)^(?:__)?(?:nanosleep|clock_nanosleep|sleep|usleep|select|pselect6?|poll|ppoll"
            r"|epoll_wait|epoll_pwait|futex|sem_wait|sem_timedwait|pthread_cond_wait"
            r"|pthread_cond_timedwait|pthread_join|pthread_mutex_lock|pthread_rwlock_\w+lock"
            r"|recv|recvmsg|recvfrom|accept|wait4|waitpid|lll_lock_wait\w*|futex_wait\w*"
            r"|do_futex|schedule|io_schedule)$|time\.sleep|function sleep\b|threading\.py.*wait"
            r"|lock\.acquire|method acquire of|queue\.py\(\d+\): get$|connection\.py\(\d+\): (?:recv|poll)"
        ),
    ),
    (
        # Tensor math on the CPU (a CPU fill, copy or reduction): work, not launching.
        "cpu_compute",
        (
            r"(?i)TensorIteratorBase::(?:for_each|serial_for_each)|\bcpu_kernel(?:_vec)?\b|VectorizedLoop2d"
            r"|vectorized_loop|basic_loop|\bGOMP_\w+|\bgomp_\w+|libgomp|\bmkl_\w+|libmkl|openblas|dnnl::"
            r"|at::vec::|invoke_parallel|at::internal::|libiomp"
        ),
    ),
    (
        "launch_overhead",
        (
            r"(?i)^cu(?:da)?Launch|^cuLaunch|libcudart|libcuda\.so|^cuKernel"
            r"|c10::Dispatcher|at::_ops::|c10::impl::|^aten::(?:split|split_with_sizes|chunk|cat"
            r"|view|narrow|slice|select|as_strided|unbind|stack|reshape|expand|t|transpose|contiguous"
            r"|copy_|to|_to_copy|mm|matmul|linear|addmm|bmm|index|index_select|unsqueeze|squeeze"
            r"|permute|detach|empty_strided|resize_)$|torch\.split|split_with_sizes|libtorch_cuda"
            r"|launch_kernel|cudaLaunchKernel|cuLaunchKernel"
        ),
    ),
    (
        "python",
        (
            r"(?i)_PyEval_|PyEval_|_PyObject_|PyObject_|_PyFunction|libpython|python3\.\d+"
            r"|^\S+\.py\(\d+\)|\.py:\d+|built-in (?:method|function)|_Py[A-Z]|Py[A-Z]\w+_"
        ),
    ),
)


@functools.cache
def _cause_rules() -> tuple[tuple[str, re.Pattern[str]], ...]:
    """:data:`_CAUSE_PATTERNS` compiled, on first use: compiling them takes about 15 ms,
    which a question answered from the findings cache does not need to pay."""
    return tuple((cause, re.compile(pattern)) for cause, pattern in _CAUSE_PATTERNS)


#: Modules of the profiler itself: its samples say the profiler was intercepting a call
#: (an OS-runtime or CUDA trace hook), not what the program was doing.
PROFILER_MODULES = re.compile(r"(?i)ToolsInjection|libcupti|libnvperf|libnvtx|nsys|libpcsamplingutil|QdstrmImporter")


@functools.lru_cache(maxsize=65536)
def cause_of_name(name: str | None) -> str | None:
    """The gap cause a single frame, call or op name points to, or ``None``."""
    if not name:
        return None
    for cause, rule in _cause_rules():
        if rule.search(name):
            return cause
    return None


def causes_of_names(names: pl.Series, default: str | None = None) -> pl.DataFrame:
    """``name, cause``: :func:`cause_of_name` of every distinct name (or ``default``), all at once.

    The rules run as polars regexes over the names together (an emit_nvtx trace has a
    distinct name per range: 100k Python regex searches take seconds). Names whose match
    could differ between Python's and polars' regex engines (non-ASCII, a newline: ``$``,
    case folding) and rules polars cannot compile go through :func:`cause_of_name` itself.
    """
    names = names.unique().drop_nulls()
    plain = names.str.contains(r"^[\x20-\x7e\t]*$")
    by_rules, rest = names.filter(plain).to_frame("name"), names.filter(~plain)
    try:
        rule_cause = pl.lit(None, pl.String)
        for cause, rule in reversed(_cause_rules()):
            if rule.flags & (re.VERBOSE | re.ASCII | re.LOCALE) or not isinstance(rule.pattern, str):
                raise pl.exceptions.ComputeError("a rule only Python's re can run")
            flags = "".join(letter for flag, letter in ((re.IGNORECASE, "i"), (re.MULTILINE, "m"), (re.DOTALL, "s"))
                            if rule.flags & flag)
            pattern = f"(?{flags}){rule.pattern}" if flags else rule.pattern
            rule_cause = pl.when(pl.col("name").str.contains(pattern)).then(pl.lit(cause)).otherwise(rule_cause)
        by_rules = by_rules.with_columns(cause=rule_cause.fill_null(pl.lit(default, pl.String)))
    except pl.exceptions.PolarsError:
        by_rules, rest = pl.DataFrame(schema={"name": pl.String, "cause": pl.String}), names
    rest = rest.to_list()
    table = pl.concat([
        by_rules,
        pl.DataFrame({"name": rest, "cause": [cause_of_name(name) or default for name in rest]},
                     schema={"name": pl.String, "cause": pl.String}),
    ])
    # cause_of_name of an empty name is None: it takes the default.
    return table.with_columns(
        cause=pl.when(pl.col("name") == "").then(pl.lit(default, pl.String)).otherwise("cause"))


_HEX_ADDRESS = re.compile(r"^(?:0x)?[0-9a-fA-F]{6,}$")


def is_unresolved(frame: str | None) -> bool:
    """A frame the profiler could not symbolize (a bare address such as ``0x7f90f93a1efa``)."""
    return not frame or bool(_HEX_ADDRESS.match(frame))


def cause_of_stack(frames: list[str] | None, modules: list[str] | None = None) -> str:
    """The cause a sampled stack points to: the innermost frame that matches a rule wins.

    Frames are innermost first. An unresolved frame counts through its module where the
    module alone is telling (``libcuda.so`` means launching); an unresolved frame inside the
    interpreter binary is *not* "python": it may as well be the garbage collector. Returns
    ``"unresolved"`` when no frame could be read, ``"unknown"`` when frames were read but
    none matched a rule.
    """
    frames = frames or []
    modules = modules or [None] * len(frames)
    fallback = None
    resolved_any = False
    # Where the innermost frame is unreadable, an interpreter frame further out only says
    # that Python called *something*: the sample is unresolved, not "python".
    innermost_unreadable = bool(frames) and is_unresolved(frames[0])
    for frame, module in zip(frames, modules):
        if is_unresolved(frame):
            if module and PROFILER_MODULES.search(module):
                continue  # the profiler's own hook around a call: look further out
            cause = cause_of_name(module)
            if cause == "python":
                cause = None
        else:
            resolved_any = True
            cause = cause_of_name(frame)
        if cause == "python":
            # Interpreter frames sit around everything in a PyTorch stack: keep looking for
            # something more specific further out, and fall back to "python".
            fallback = fallback or "python"
            continue
        if cause is not None:
            return cause
    if fallback and not innermost_unreadable:
        return fallback
    return "unknown" if resolved_any and not innermost_unreadable else "unresolved"


#: What ``torch.autograd.profiler.emit_nvtx()`` and ``record_shapes`` append to an op's name
#: (``aten::mm, seq = 47555, op_id = 12, sizes = [[2048, 4096], []]``): unique per call, so
#: names are grouped without it.
EMIT_NVTX_SUFFIX = r",\s*(?:stashed\s+)?(?:seq|op_id|sizes|input_op_ids)\s*=.*$"


def range_group_expr(column: str = "name") -> pl.Expr:
    """Polars expression: the annotation name that instances are grouped by (suffixes that
    make every call unique removed; the raw name is kept beside it by callers)."""
    return pl.col(column).str.replace(EMIT_NVTX_SUFFIX, "")


def comm_kernel_expr(patterns: tuple[str, ...] = DEFAULT_COMM_PATTERNS) -> pl.Expr:
    """Polars expression: is this kernel row a communication kernel?"""
    combined = "|".join(f"(?:{p})" for p in patterns)
    return (
        pl.col("name").fill_null("").str.contains(combined)
        | pl.col("detail").fill_null("").str.contains(combined)
        | pl.col("comm_op").is_not_null()
    )


def host_sync_expr() -> pl.Expr:
    """Polars expression: is this CPU row a host wait on the GPU?"""
    return (pl.col("kind") == "sync") & pl.col("tid").is_not_null() | (
        (pl.col("kind") == "cuda_api") & pl.col("name").str.contains(HOST_SYNC_API.pattern)
    )


def launch_expr() -> pl.Expr:
    """Polars expression: is this CPU row a launch of GPU work?"""
    return (pl.col("kind") == "cuda_api") & pl.col("name").str.contains(LAUNCH_API.pattern)


#: The coarse MoE phases and the words in a range name that mark them, tried in order.
PHASE_WORDS = (
    ("dispatch", ("dispatch",)),
    ("combine", ("combine",)),
    ("attention", ("attention", "attn")),
    ("experts", ("expert", "grouped", "moe_mlp", "ffn", "mlp")),
)


def phase_word_expr(column: str = "name") -> pl.Expr:
    """Polars expression: does the name hold any word of :data:`PHASE_WORDS`? One search for
    every phase, to pick the few names :func:`phase_expr` must tell apart among many."""
    words = [word for _, phase_words in PHASE_WORDS for word in phase_words]
    return pl.col(column).str.contains_any(words, ascii_case_insensitive=True)


def phase_class(name: str | None) -> str | None:
    """Coarse MoE phase of an annotation name: attention, dispatch, experts, combine."""
    if not name:
        return None
    lowered = name.lower()
    return next((phase for phase, words in PHASE_WORDS if any(word in lowered for word in words)), None)


def phase_expr(column: str = "name") -> pl.Expr:
    """:func:`phase_class` as a polars expression (every distinct name at once).

    One Aho-Corasick search per phase, ASCII case folded: the same answer as Python's
    ``lower()`` for these all-ASCII words (of the non-ASCII letters whose lowercase holds an
    ASCII letter, the Kelvin sign gives ``k``, which no word holds, and ``İ`` gives ``i`` and a
    combining dot, which no word ends before), at a fifth of the cost of lowercasing every
    name and searching each word apart."""
    name = pl.col(column)
    expr = pl.when(pl.lit(False)).then(pl.lit(None, pl.String))
    for phase, words in PHASE_WORDS:
        expr = expr.when(name.str.contains_any(list(words), ascii_case_insensitive=True)).then(pl.lit(phase))
    return expr.otherwise(pl.lit(None, pl.String))
