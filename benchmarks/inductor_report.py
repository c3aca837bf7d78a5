"""What inductor's generated code for a graph costs: Triton memory traffic, kernel counts, extern calls,
and layout conversions at cuDNN's convolution backward.

Reads the wrappers that `--inductor_code` saves on a GPU (train_throughput.py, sample_throughput.py) or
that `--offline` generates here without one (offline_cuda_codegen.py), and prints, per graph:
- Triton kernel launches and the bytes they move (inductor's own count per kernel, from its metadata),
  split into GroupNorm statistics (reductions), GroupNorm applications, GroupNorm in one pass (a reduction
  that also writes the output, as sampling's group_norm_act compiles), other elementwise work, and
  launches under 2 MB (by the ops a kernel's name lists, so the backward of GroupNorm32's compiled formula
  counts as other work); and the time those bytes take at `--bandwidth` (a lower bound: the kernels are
  memory-bound). Code saved on a GPU has the bytes only with TORCHINDUCTOR_BENCHMARK_KERNEL=1;
- the layouts of the image buffers (4-D, leading with the batch), where NCHW ones in a channels_last graph
  are layout conversions;
- the extern kernels (cuDNN convolutions, cuBLAS matmuls, attention), which do the FLOPs;
- for each convolution backward, the layouts of its gradient, input and weight. ATen copies a gradient
  that does not match the layout it hands cuDNN (channels_last when the input or the weight is): once if
  it is dense in the other layout, twice (for the data and the weight gradient) if it is not dense, as a
  channel slice is (aten/src/ATen/native/cudnn/ConvShared.cpp).

With `--kernel_times` (the .json a benchmark writes beside each profile), one graph's Triton kernels instead,
each with its device time in the profile and the bandwidth it achieved, summed per category.

    python benchmarks/inductor_report.py out/train/inductor-code.py
    python benchmarks/inductor_report.py --offline sample --preset ddpm_cifar10 --batch_size 512 --channels_last
    python benchmarks/inductor_report.py out/sample/inductor-code.py \\
        --kernel_times out/sample/profile-sample-bf16-cl-compile-graph.json --graph "sample bf16-cl-compile-graph batch 512:"
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from collections import Counter
from dataclasses import dataclass, field

_KERNEL = re.compile(r"^(\w+) = async_compile\.triton\('(\w+)', '''(.*?)'''", re.S | re.M)
_SOURCE = re.compile(r"async_compile\.triton\('\w+', '''.*?'''", re.S)
_LAYOUT = re.compile(r"(\w+) = empty_strided_cuda\(\(([^)]*)\), \(([^)]*)\)")
_ASSERT = re.compile(r"assert_(?:size_stride|tensor_metadata)\((\w+), \(([^)]*)\), \(([^)]*)\)")
_GROUPED = re.compile(r"assert_size_stride_grouped\((.*)\)\s*$", re.M)
_REINTERPRET = r"reinterpret_tensor\((\w+), \(([^)]*)\), \(([^)]*)\), \d+\)"  # a view: (base, shape, strides)
_VIEW = re.compile(r"(\w+) = " + _REINTERPRET)
_REUSE = re.compile(r"(\w+) = (\w+); del \2  # reuse")
TINY_BYTES = 2e6


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def layout_name(shape: tuple[int, ...], stride: tuple[int, ...]) -> str:
    """NCHW, CL (channels_last), either (a shape where both coincide) or the strides, for a 4-D tensor."""
    if len(shape) != 4:
        return f"{len(shape)}-D"
    n, c, h, w = shape
    fits = lambda want: all(s == x or d == 1 for s, x, d in zip(stride, want, shape))  # noqa: E731
    nchw, nhwc = fits((c * h * w, h * w, w, 1)), fits((h * w * c, 1, w * c, c))
    return "either" if nchw and nhwc else "CL" if nhwc else "NCHW" if nchw else f"strides {stride}"


def cudnn_format(input_layout: str, weight_layout: str) -> str:
    """The layout ATen hands cuDNN: channels_last if the input or the weight is (cudnn_conv_suggest_memory_format)."""
    return "CL" if "CL" in (input_layout, weight_layout) else "NCHW"


@dataclass
class GraphReport:
    label: str
    launches: Counter = field(default_factory=Counter)  # category -> Triton launches
    bytes: Counter = field(default_factory=Counter)  # category -> bytes moved
    extern: Counter = field(default_factory=Counter)  # extern kernel -> calls
    conv_backward: Counter = field(default_factory=Counter)  # (grad, input, weight) layouts -> calls
    activations: Counter = field(default_factory=Counter)  # layout -> 4-D buffers with the batch's leading size
    bytes_known: bool = True  # False for code generated without kernel_num_gb in its metadata

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())


def _split_args(text: str) -> list[str]:
    args, depth, current = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            args.append(current.strip())
            current = ""
            continue
        depth += ch in "(["
        depth -= ch in ")]"
        current += ch
    return args + [current.strip()]


def _category(name: str, num_bytes: float | None, source: str = "") -> str:
    if num_bytes is not None and num_bytes < TINY_BYTES:
        return "launches under 2 MB"
    # ATen's GroupNorm names its kernels; GroupNorm32's compiled formula shows as var_mean (statistics) and
    # rsqrt (application) in the ops a kernel fuses.
    if any(op in name for op in ("group_norm", "var_mean", "rsqrt")):
        if not name.startswith(("triton_red", "triton_per")):
            return "GroupNorm application"
        # A reduction that also stores at the reduced index writes the normalised output (group_norm_act).
        return "GroupNorm in one pass" if re.search(r"tl\.store\(.*\br0_", source) else "GroupNorm statistics"
    return "other elementwise"


def _kernels(code: str) -> dict[str, tuple[str, float | None, str]]:
    """A wrapper's Triton kernels: variable -> (kernel name, bytes a launch moves or None, source)."""
    kernels = {}
    for var, name, source in _KERNEL.findall(code):
        found = re.search(r"'kernel_num_gb': ([0-9.e+-]+)", source)
        kernels[var] = (name, float(found.group(1)) * 1e9 if found else None, source)
    return kernels


def _call_body(code: str) -> str:
    """The wrapper's `call` (the launches and extern calls, in order), without comments."""
    body = _SOURCE.sub("", code)  # each kernel's source holds a benchmark harness with its own `call`
    body = body[body.find("def call("):]
    return "\n".join(line for line in body.splitlines() if not line.lstrip().startswith("#"))


def _launched(kernels: dict, body: str) -> list[tuple[str, float | None, str]]:
    """(name, bytes, source) of each Triton launch in `call`, in order."""
    return [kernels.get(var, (var, None, "")) for var in re.findall(r"^\s+(\w+)\.run\(", body, re.M)]


def analyse_wrapper(code: str, label: str) -> GraphReport:
    """One compiled graph's wrapper (the module inductor writes: kernels, then `call`)."""
    report = GraphReport(label)
    kernels = _kernels(code)
    report.bytes_known = all(num_bytes is not None for _, num_bytes, _ in kernels.values())
    body = _call_body(code)
    for name, num_bytes, source in _launched(kernels, body):
        category = _category(name, num_bytes, source)
        report.launches[category] += 1
        report.bytes[category] += num_bytes or 0.0
    report.extern.update(re.findall(r"extern_kernels\.(\w+)\(", body))
    report.extern.update(re.findall(r"torch\.ops\.aten\.(\w+)\.default\(", body))

    layouts: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for regex in (_LAYOUT, _ASSERT):
        for name, shape, stride in regex.findall(body):
            layouts[name] = (_ints(shape), _ints(stride))
    for grouped in _GROUPED.findall(body):  # (names), (shapes), (strides), 'what'
        names, shapes, strides = _split_args(grouped)[:3]
        for name, shape, stride in zip(_split_args(names.strip("()")), ast.literal_eval(shapes),
                                       ast.literal_eval(strides)):
            layouts[name] = (tuple(shape), tuple(stride))
    for name, _, shape, stride in _VIEW.findall(body):
        layouts[name] = (_ints(shape), _ints(stride))
    reused = dict(_REUSE.findall(body))
    # Activations: the 4-D buffers with a height and width whose leading size is the most common one (the
    # batch; weights lead with their output channels). In a channels_last graph each NCHW one is a conversion.
    images = [(shape, stride) for shape, stride in layouts.values() if len(shape) == 4 and min(shape[2:]) > 1]
    batch = Counter(shape[0] for shape, _ in images).most_common(1)
    report.activations.update(layout_name(shape, stride) for shape, stride in images if shape[0] == batch[0][0])

    def layout_of(arg: str) -> str:
        view = re.fullmatch(_REINTERPRET, arg)
        if view:
            return layout_name(_ints(view.group(2)), _ints(view.group(3)))
        for _ in range(len(reused) + 1):
            if arg in layouts:
                return layout_name(*layouts[arg])
            if arg not in reused:
                break
            arg = reused[arg]
        return "unknown"

    calls = re.findall(r"(?:extern_kernels\.convolution_backward|torch\.ops\.aten\.convolution_backward\.default)"
                       r"\((.*)\)\s*$", body, re.M)
    for call in calls:
        report.conv_backward[tuple(layout_of(a) for a in _split_args(call)[:3])] += 1
    return report


@dataclass
class KernelTime:
    name: str
    category: str
    launches: int  # per call of the graph
    bytes: float  # per launch
    seconds: float  # per call of the graph, all its launches


def kernel_times(code: str, times: dict[str, dict]) -> tuple[list[KernelTime], float]:
    """One graph's Triton kernels joined by name with a profile's device times (bench_common.write_profile's
    JSON: name -> calls, device_us), and how many calls of the graph the profile saw (the median over kernels of
    calls / launches per graph call). Kernels the profile did not see are left out."""
    launches: dict[str, list] = {}
    for name, num_bytes, source in _launched(_kernels(code), _call_body(code)):
        launches.setdefault(name, [0, num_bytes or 0.0, _category(name, num_bytes, source)])[0] += 1
    seen = [(name, n, num_bytes, category) for name, (n, num_bytes, category) in launches.items() if name in times]
    if not seen:
        return [], 0.0
    ratios = sorted(times[name]["calls"] / n for name, n, _, _ in seen)
    calls = ratios[len(ratios) // 2]
    rows = [KernelTime(name, category, n, num_bytes, times[name]["device_us"] * 1e-6 / calls)
            for name, n, num_bytes, category in seen]
    return sorted(rows, key=lambda row: -row.seconds), calls


def print_kernel_times(rows: list[KernelTime], calls: float, label: str, top: int = 15) -> None:
    """Time and achieved bandwidth per category and for the slowest kernels, per call of the graph."""
    print(f"\n{label}: Triton kernels timed in {calls:.0f} calls of the graph (per call)")
    print(f"  {'':24s} {'launches':>8s} {'GB':>7s} {'ms':>7s} {'TB/s':>6s}")
    categories: dict[str, list[float]] = {}
    for row in rows:
        total = categories.setdefault(row.category, [0, 0.0, 0.0])
        total[0] += row.launches
        total[1] += row.launches * row.bytes
        total[2] += row.seconds
    categories["all Triton kernels"] = [sum(v[i] for v in categories.values()) for i in range(3)]
    for category, (n, num_bytes, seconds) in categories.items():
        print(f"  {category:24s} {n:8d} {num_bytes / 1e9:7.2f} {1e3 * seconds:7.2f} {num_bytes / seconds / 1e12:6.2f}")
    print(f"  the {min(top, len(rows))} longest (launches, MB and us a launch, TB/s):")
    for row in rows[:top]:
        each = row.seconds / row.launches
        print(f"    {row.name[:90]:90s} x{row.launches:<3d} {row.bytes / 1e6:8.1f} {1e6 * each:8.1f} "
              f"{row.bytes / each / 1e12:6.2f}")


def split_graphs(text: str) -> list[tuple[str, str]]:
    """(label, wrapper) per graph in a file of wrappers, as InductorCode writes (with `# ===== label`
    headers) or as offline_cuda_codegen returns them (one module after another)."""
    if "# ===== " in text:
        parts = re.split(r"^# ===== (.*)$", text, flags=re.M)[1:]
        return [(label, code) for label, code in zip(parts[::2], parts[1::2]) if "def call(" in code]
    modules = re.split(r"^(?=from ctypes import)", text, flags=re.M)
    return [(f"graph {i + 1}", code) for i, code in enumerate(m for m in modules if "def call(" in m)]


def print_report(reports: list[GraphReport], bandwidth: float) -> None:
    for report in reports:
        total = report.total_bytes
        if report.bytes_known:
            print(f"\n{report.label}: {sum(report.launches.values())} Triton launches, {total / 1e9:.2f} GB, "
                  f">= {1e3 * total / bandwidth:.2f} ms at {bandwidth / 1e12:.2f} TB/s")
        else:
            print(f"\n{report.label}: {sum(report.launches.values())} Triton launches, bytes unknown (inductor "
                  "writes them with TORCHINDUCTOR_BENCHMARK_KERNEL=1)")
        for category, num_bytes in (report.bytes if report.bytes_known else report.launches).most_common():
            share = f"  {num_bytes / 1e9:7.2f} GB ({100 * num_bytes / max(total, 1):4.1f}%)" if report.bytes_known else ""
            print(f"  {category:24s} {report.launches[category]:5d} launches{share}")
        print("  extern kernels: " + ", ".join(f"{name} x{n}" for name, n in sorted(report.extern.items())))
        print("  activation buffers: " + ", ".join(f"{layout} x{n}" for layout, n in report.activations.most_common()))
        for (grad, inp, weight), n in report.conv_backward.most_common():
            copied = [what for what, layout in (("gradient", grad), ("input", inp))
                      if layout not in (cudnn_format(inp, weight), "either")]
            mark = f"  <- ATen copies the {' and '.join(copied)} into {cudnn_format(inp, weight)}" if copied else ""
            print(f"  convolution_backward x{n}: gradient {grad}, input {inp}, weight {weight}{mark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("code", nargs="?", help="a file of inductor wrappers (--inductor_code's output)")
    parser.add_argument("--offline", choices=["sample", "train"], help="generate the code here first, without a GPU")
    parser.add_argument("--preset", default="ddpm_cifar10")
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--autocast_weights", action="store_true",
                        help="with --offline: autocast casts the weights at each call (and training their gradients "
                             "back), as before session 10; by default they are held in bf16, as FastForward and "
                             "TrainStep run a UNet")
    parser.add_argument("--save", default=None, help="with --offline: also write the generated code here")
    parser.add_argument("--bandwidth", type=float, default=3.35e12, help="bytes/s (an H100 SXM's HBM3: 3.35e12)")
    parser.add_argument("--kernel_times", default=None,
                        help="a profile's device times by kernel (the .json beside a profile-*.txt): each Triton "
                             "kernel's time and achieved bandwidth in the graph --graph names")
    parser.add_argument("--graph", default=None, help="with --kernel_times: the graphs whose labels start so, "
                                                      "e.g. 'sample bf16-cl-compile-graph+cdt batch 512:'")
    args = parser.parse_args()
    if args.kernel_times and not args.graph:
        parser.error("--kernel_times needs --graph, the label of the graph the profile timed")
    if args.offline:
        from ddpm_lightning.models import build_unet
        from offline_cuda_codegen import sampling_forward_code, training_step_code

        net = build_unet(args.preset)
        if args.offline == "sample":
            codes = sampling_forward_code(net, args.batch_size, args.channels_last, not args.autocast_weights)
        else:
            grad_layouts: list = []
            codes = training_step_code(net, args.batch_size, args.channels_last, grad_layouts,
                                       held_weights=not args.autocast_weights)
            print(f"weights whose gradient the backward returns in another layout: {len(grad_layouts)}"
                  + "".join(f"\n  {name}: weight {w}, gradient {g}" for name, w, g in grad_layouts[:10]))
        text = "\n".join(codes)
        if args.save:
            with open(args.save, "w") as handle:
                handle.write(text)
    elif args.code:
        with open(args.code) as handle:
            text = handle.read()
    else:
        parser.error("give a file of inductor code or --offline sample|train")
    graphs = split_graphs(text)
    if not graphs:
        raise SystemExit("no inductor wrapper found (a file written by --inductor_code or --save)")
    if args.kernel_times:
        # A variant may compile several graphs (sampling: the network, and the seeded noise's draw); each one.
        matching = [(label, code) for label, code in graphs if label.startswith(args.graph)]
        if not matching:
            raise SystemExit(f"--graph {args.graph!r} names no graph; labels: "
                             + "; ".join(label for label, _ in graphs))
        with open(args.kernel_times) as handle:
            times = json.load(handle)
        joined = [(label, *kernel_times(code, times)) for label, code in matching]
        if not any(rows for _, rows, _ in joined):
            raise SystemExit(f"{args.kernel_times} times none of the kernels of {args.graph!r}")
        for label, rows, calls in joined:
            if rows:
                print_kernel_times(rows, calls, label)
        return
    print_report([analyse_wrapper(code, label) for label, code in graphs], args.bandwidth)


if __name__ == "__main__":
    main()
