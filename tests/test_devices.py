"""Any device, not only GPU 0 (issue 27): ``device="cuda:1"`` or a rank's ``cuda:LOCAL_RANK`` is the
GPU every tensor, bf16 decision, event, stream, pinned copy, memory statistic and synchronize uses.

A structural check of the package and the benchmarks (their syntax trees, not their text): each
call of a CUDA function that acts on one GPU names it, or runs inside a block that makes it CUDA's
current GPU (``with torch.cuda.device(...)`` / ``with on_device(...)``); nothing calls ``.cuda()``
or ``torch.device("cuda")`` where a device was given; pinned memory is made inside such a block.
Then the device helpers (``devices.py``, ``models/precision.py``), on the CPU with CUDA's functions
replaced by recorders. ``tests/test_cuda.py`` runs a model on ``cuda:1`` where two GPUs are.
"""

import ast
import contextlib
from pathlib import Path

import pytest
import torch

from fiftyone_grounding import devices
from fiftyone_grounding.models import precision

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fiftyone_grounding"
BENCHMARKS = REPO / "benchmarks"

# torch.cuda functions that act on one GPU: called without one, they act on CUDA's current GPU
PER_GPU = {"synchronize", "memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved",
           "reset_peak_memory_stats", "reset_max_memory_allocated", "reset_accumulated_memory_stats",
           "memory_stats", "memory_summary", "mem_get_info", "get_device_capability", "get_device_properties",
           "get_device_name", "current_stream", "default_stream", "Stream", "set_device", "utilization",
           "memory_usage", "temperature", "power_draw", "clock_rate", "caching_allocator_alloc"}
# torch.cuda functions that take no device and ask the current GPU: only inside a device block
CURRENT_GPU_ONLY = {"Event", "is_bf16_supported", "current_device", "ExternalStream", "graph", "CUDAGraph"}
# opening one of these in a ``with`` makes its device CUDA's current GPU for the block
DEVICE_BLOCKS = {"torch.cuda.device", "torch.cuda.device_of", "fiftyone_grounding.devices.on_device"}
# (file, function, torch.cuda function) that ask the current GPU on purpose
ALLOWED = {("fiftyone_grounding/devices.py", "cuda_index", "current_device")}  # a bare "cuda" means it
CUDA_DEFAULT = {("fiftyone_grounding/devices.py", "resolve_device")}  # "cuda" where none was given


def _aliases(tree: ast.Module, package: str) -> dict[str, str]:
    """Local name -> the dotted name it stands for, from every import of the module."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    head = alias.name.split(".")[0]
                    names[head] = head
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: inside the package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([module] if module else []))
            for alias in node.names:
                names[alias.asname or alias.name] = f"{module}.{alias.name}" if module else alias.name
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str:
    """``torch.cuda.synchronize`` for ``torch.cuda.synchronize``, ``cuda.synchronize`` after ``from
    torch import cuda``, ``sync`` after ``from torch.cuda import synchronize as sync``; "" for others."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _names_cuda(node: ast.AST) -> bool:
    """Whether ``node`` holds the bare string "cuda" (the current GPU), e.g. ``"cuda" if ok else "cpu"``."""
    return any(isinstance(n, ast.Constant) and n.value == "cuda" for n in ast.walk(node))


def _is_none(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def _device_argument(call: ast.Call) -> bool:
    """Whether ``call`` names a GPU: a first argument or ``device=``, neither None nor a bare "cuda"."""
    given = [kw.value for kw in call.keywords if kw.arg == "device"] + call.args[:1]
    return any(not _is_none(arg) and not (isinstance(arg, ast.Constant) and arg.value == "cuda") for arg in given)


def device_problems(source: str, path: str, pinned: bool = True) -> tuple[list[str], int]:
    """The calls of ``source`` (the file ``path``, relative to the repository) that use CUDA's
    current GPU where a device should be named, as "path:line: what"; and how many calls of
    CUDA's per-GPU functions it checked. ``pinned``: pinned memory must be made inside a device block."""
    tree = ast.parse(source)
    module = path.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
    aliases = _aliases(tree, module if path.endswith("__init__.py") else module.rpartition(".")[0])
    problems: list[str] = []
    checked = 0

    def visit(node: ast.AST, blocks: int, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, (ast.With, ast.AsyncWith)):
            opens = sum(isinstance(item.context_expr, ast.Call) and _dotted(item.context_expr.func, aliases)
                        in DEVICE_BLOCKS and _device_argument(item.context_expr) for item in node.items)
            for item in node.items:
                visit(item, blocks, function)
            for child in node.body:
                visit(child, blocks + opens, function)
            return
        if isinstance(node, ast.Call):
            check(node, blocks, function)
        for child in ast.iter_child_nodes(node):
            visit(child, blocks, function)

    def check(call: ast.Call, blocks: int, function: str) -> None:
        nonlocal checked
        name = _dotted(call.func, aliases)
        where = f"{path}:{call.lineno}"
        fn = name.removeprefix("torch.cuda.") if name.startswith("torch.cuda.") else None
        if fn in PER_GPU:
            checked += 1
            if not _device_argument(call) and not blocks:
                problems.append(f"{where}: torch.cuda.{fn}() names no device (acts on the current GPU)")
        elif fn in CURRENT_GPU_ONLY:
            checked += 1
            if not blocks and (path, function, fn) not in ALLOWED:
                problems.append(f"{where}: torch.cuda.{fn}() asks the current GPU outside a device block")
        elif fn in {"device", "device_of"} and not _device_argument(call):
            problems.append(f"{where}: torch.cuda.{fn}() without a device")
        if isinstance(call.func, ast.Attribute) and call.func.attr == "cuda" and not _device_argument(call):
            problems.append(f"{where}: .cuda() without a device (the current GPU)")
        if name == "torch.device" and len(call.args) == 1 and not any(kw.arg == "index" for kw in call.keywords) \
                and _names_cuda(call.args[0]) and (path, function) not in CUDA_DEFAULT:
            problems.append(f"{where}: torch.device(\"cuda\") without an index (the current GPU)")
        if isinstance(call.func, ast.Attribute) and call.func.attr == "to" and any(
                isinstance(a, ast.Constant) and a.value == "cuda" for a in call.args):
            problems.append(f"{where}: .to(\"cuda\") (the current GPU)")
        if any(kw.arg == "device" and isinstance(kw.value, ast.Constant) and kw.value.value == "cuda"
               for kw in call.keywords) and (path, function) not in CUDA_DEFAULT:
            problems.append(f"{where}: device=\"cuda\" (the current GPU)")
        if pinned and not blocks:
            pins = isinstance(call.func, ast.Attribute) and call.func.attr == "pin_memory"
            # torch.empty(..., pin_memory=True) and the like; a DataLoader pins where it is iterated
            pins = pins or (any(kw.arg == "pin_memory" for kw in call.keywords) and name.startswith("torch.")
                            and not name.endswith("DataLoader"))
            if pins:
                problems.append(f"{where}: pinned memory made outside a device block (pinned for the current GPU)")

    visit(tree, 0, "")
    return problems, checked


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py")) + sorted(BENCHMARKS.glob("*.py"))


def test_no_code_uses_the_current_gpu_where_a_device_was_given():
    """Every CUDA call that acts on one GPU, in the package and the benchmarks, names it or sits
    in a device block; pinned memory (the package's; a benchmark makes its GPU the current one)
    is made inside a device block; no ``.cuda()`` or ``torch.device("cuda")`` stands for a device."""
    problems, checked = [], 0
    for path in _sources():
        found, count = device_problems(path.read_text(), str(path.relative_to(REPO)),
                                       pinned=path.is_relative_to(PACKAGE))
        problems += found
        checked += count
    assert checked >= 8, f"only {checked} per-GPU CUDA calls seen: the scan misses them"
    assert not problems, "\n".join(problems)


def test_the_device_check_finds_each_way_of_using_the_current_gpu():
    """The check above is not a pattern that misses an alias: each of these is found, each
    corrected form passes."""
    bad = '''
import torch
import torch.cuda as tc
from torch import cuda
from torch.cuda import max_memory_allocated as peak, Event

def f(device, x):
    torch.cuda.synchronize()
    tc.reset_peak_memory_stats(None)
    cuda.get_device_capability()
    peak()
    torch.cuda.max_memory_allocated(device="cuda")
    torch.cuda.is_bf16_supported()
    Event()
    torch.cuda.current_stream()
    torch.cuda.Stream(priority=-1)
    x.cuda()
    x.to("cuda")
    torch.zeros(1, device="cuda")
    torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x.pin_memory()
    torch.empty(3, pin_memory=True)
    with torch.cuda.device(device):
        pass
    torch.cuda.current_device()
'''
    problems, checked = device_problems(bad, "fiftyone_grounding/example.py")
    lines = {int(p.split(":")[1]) for p in problems}
    assert sorted(lines) == list(range(8, 23)) + [25], problems  # every line but the device block's
    assert checked == 10
    good = '''
import torch
from .devices import on_device

def f(device, x):
    torch.cuda.synchronize(device)
    torch.cuda.max_memory_allocated(device=device)
    torch.cuda.get_device_capability(device)
    torch.cuda.Stream(device=device)
    x.cuda(device)
    x.to(device)
    torch.device("cuda", 1)
    with on_device(device):
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))
        x.pin_memory()
        torch.empty(3, pin_memory=True)
        torch.cuda.is_bf16_supported()
    with torch.cuda.device(device):
        torch.cuda.synchronize()
    torch.utils.data.DataLoader([], pin_memory=True)
'''
    assert device_problems(good, "fiftyone_grounding/example.py") == ([], 8)


# -- the device helpers ------------------------------------------------------------------------------


def test_resolve_device_keeps_the_index_it_is_given(monkeypatch):
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert devices.resolve_device(torch.device("cuda", 3)).index == 3
    assert devices.resolve_device(1) == torch.device("cuda", 1)
    assert devices.resolve_device(0) == torch.device("cuda", 0)  # not "none given"
    assert devices.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device(None) == devices.resolve_device("") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # none given: CUDA's current GPU, without an index (a launcher made it the rank's own)
    assert devices.resolve_device(None) == torch.device("cuda")


def test_cuda_index_is_the_named_gpu_and_for_a_bare_cuda_the_current_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert devices.cuda_index("cuda:1") == 1 and devices.cuda_index(torch.device("cuda", 0)) == 0
    assert devices.cuda_index("cuda") == 2
    assert devices.cuda_index("cpu") is None and devices.cuda_index("meta") is None


def test_on_device_makes_the_named_gpu_current_and_nothing_else():
    block = devices.on_device("cuda:1")
    assert isinstance(block, torch.cuda.device) and block.idx == 1  # made, not entered: no GPU needed
    for device in ("cpu", "meta", "cuda", torch.device("cpu")):
        assert isinstance(devices.on_device(device), contextlib.nullcontext), device


@pytest.fixture
def cuda_recorder(monkeypatch):
    """CUDA's per-GPU functions replaced by recorders of the device each was asked about: GPU 1
    is an Ampere (8.0), GPU 0 a Turing (7.5), and the current GPU is 0. ``is_bf16_supported``
    (which takes no device and asks the current GPU) must not be called."""
    asked = []
    capability = {0: (7, 5), 1: (8, 0)}

    def index(device):
        device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        return device.index if device.index is not None else 0

    def record(name, value):
        def fn(device=None, *args, **kwargs):
            asked.append((name, device))
            return value(index(device)) if callable(value) else value
        return fn

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", record("capability", capability.__getitem__))
    monkeypatch.setattr(torch.cuda, "synchronize", record("synchronize", None))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", record("reset", None))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", record("peak", lambda i: (i + 1) * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_allocated", record("allocated", lambda i: i * 2**29))

    def no_device(*args, **kwargs):
        raise AssertionError("torch.cuda.is_bf16_supported() asks the current GPU, not the model's")

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", no_device)
    return asked


def test_the_bf16_decision_asks_the_device_it_is_for(cuda_recorder):
    assert precision.bf16_supported("cuda:1") and precision.default_mixed_precision(torch.device("cuda", 1)) == "bf16"
    assert [str(torch.device(d)) for _, d in cuda_recorder] == ["cuda:1", "cuda:1"]
    assert not precision.bf16_supported("cuda:0") and precision.default_mixed_precision("cuda:0") == "no"
    assert not precision.bf16_supported("cpu") and precision.default_mixed_precision(torch.device("cpu")) == "no"
    assert precision.bf16_supported("cuda") is False  # the current GPU, 0, a Turing


def test_the_bf16_decision_off_cuda_and_on_rocm(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not precision.bf16_supported("cuda:1")  # no CUDA: nothing to ask
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert precision.bf16_supported("cuda:1")


def test_synchronize_and_the_memory_statistics_ask_the_named_gpu(cuda_recorder):
    devices.synchronize("cuda:1")
    devices.reset_peak_memory(torch.device("cuda", 1))
    assert devices.peak_memory_gib("cuda:1") == 2.0 and devices.memory_allocated_gib("cuda:1") == 0.5
    assert devices.cuda_capability("cuda:1") == (8, 0)
    assert [(name, str(torch.device(d))) for name, d in cuda_recorder] == [
        ("synchronize", "cuda:1"), ("reset", "cuda:1"), ("peak", "cuda:1"), ("allocated", "cuda:1"),
        ("capability", "cuda:1")]
    cuda_recorder.clear()
    devices.synchronize("cpu")
    devices.reset_peak_memory("cpu")
    assert devices.peak_memory_gib("cpu") is None and devices.memory_allocated_gib("cpu") is None
    assert devices.cuda_capability("cpu") is None and cuda_recorder == []


def test_a_batch_for_a_gpu_is_pinned_for_that_gpu(monkeypatch):
    """``to_device`` pins inside ``on_device(the model's GPU)`` (``pin_memory()`` pins for the
    current GPU), and the copy goes to that GPU."""
    from fiftyone_grounding.inference import transfer

    state = {"current": None, "pinned_for": None, "to": None}

    @contextlib.contextmanager
    def fake_on_device(device):
        state["current"] = torch.device(device)
        yield
        state["current"] = None

    class Pinned:
        def to(self, device, non_blocking=False):
            state["to"] = (torch.device(device), non_blocking)
            return self

    def pin_memory(self):
        state["pinned_for"] = state["current"]
        return Pinned()

    monkeypatch.setattr(transfer, "on_device", fake_on_device)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    transfer.to_device(torch.zeros(2), "cuda:1")
    assert state == {"current": None, "pinned_for": torch.device("cuda", 1), "to": (torch.device("cuda", 1), True)}
    assert torch.equal(transfer.to_device(torch.ones(2), "cpu"), torch.ones(2))  # the CPU: nothing pinned


def test_fit_decides_mixed_precision_on_the_device_it_trains_on(monkeypatch, tmp_path):
    """``mixed_precision="auto"`` asks the device Accelerate gives this process (a rank's
    ``cuda:LOCAL_RANK``, ``ACCELERATE_TORCH_DEVICE``), not CUDA's current GPU."""
    import accelerate

    from fiftyone_grounding.engine import fit as fit_module

    class Decided(Exception):
        pass

    class RankState:
        def __init__(self, cpu=False, **kwargs):
            self.device = torch.device("cuda", 3)

    def decide(device):
        raise Decided(device)

    monkeypatch.setattr(accelerate, "PartialState", RankState)
    monkeypatch.setattr(fit_module, "run_fingerprint", lambda *args: "run")
    monkeypatch.setattr(fit_module, "default_mixed_precision", decide)
    with pytest.raises(Decided) as decided:
        fit_module.fit(None, preset="tiny", out_dir=str(tmp_path), resume=False)
    assert decided.value.args[0] == torch.device("cuda", 3)


@pytest.mark.slow
def test_the_two_gpu_script_runs_on_the_cpu(synthetic_dataset, tiny_checkpoint, tmp_path):
    """The script that tests/test_cuda.py runs on ``cuda:1`` (where two GPUs are), here on the CPU:
    it predicts, trains a step, caches features and fits (with ``cpu=False``: Accelerate's device,
    the CPU here), so that a GPU run finds it working."""
    from cuda_device_script import run

    report = run(tiny_checkpoint, "cpu", tmp_path, synthetic_dataset, OMP_NUM_THREADS="1")
    assert report["boxes_finite"] and report["loss_finite"] and report["autocast"] == "None"
    assert report["parameters_on"] == report["fit_parameters_on"] == ["cpu"]
    assert report["cached"] == 4 and report["fit_val_iou"] is not None and report["peak_gib"] is None
    assert report["contexts_elsewhere"] == [] and report["allocated_elsewhere"] == {}
