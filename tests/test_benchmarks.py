"""The GPU benchmarks keep running: each script end to end on the CPU at toy sizes (timings mean nothing here)."""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(script, tmp_path, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "result.json"  # before args: train_throughput's --set takes the rest of the line
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--json", str(out), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILED" not in proc.stdout, proc.stdout[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_train_throughput_through_ddpm_fit(tmp_path):
    record, stdout = run("train_throughput.py", tmp_path, "--config", str(ROOT / "experiments" / "quickstart.yaml"),
                         "--variants", "fp32", "bf16-cl-graph", "--diffusers", "bf16-cl", "--warmup", "3",
                         "--steps", "2", "--attribute", "--profile_dir", str(tmp_path),
                         "--root", str(tmp_path / "runs"), "--set", "--model.net=tiny",
                         "--data.init_args.image_size=8", "--data.init_args.batch_size=8")
    results = record["results"]
    assert set(results) == {"fp32", "bf16-cl-graph", "diffusers bf16-cl"}
    assert all(r["images_per_s"] > 0 for r in results.values())
    assert results["fp32"]["batch"] == 8 and record["flops_per_train_image"] > 0
    assert "| fp32 |" in stdout and "vs best diffusers" in stdout
    # The baseline right after the first variant: a run stopped at its time limit keeps the ratio.
    order = [line.split(":")[0] for line in stdout.splitlines() if line.startswith("[train]") and "img/s" in line]
    assert order == ["[train] fp32", "[train] diffusers bf16-cl", "[train] bf16-cl-graph"]
    # --attribute: steps 1-2 by launching operator, and the weights whose gradients arrive in another layout
    assert "AccumulateGrad" in (tmp_path / "attrib-bf16-cl-graph.txt").read_text()
    assert results["bf16-cl-graph"]["grad_layout_mismatches"] == []


def test_the_experiments_switch_their_setting_on_for_the_variant_only(monkeypatch):
    """+reads4 and +combo set inductor's options; +autocast-weights turns TrainStep's held weights off; +aten-gn
    brings back the UNet session 5 measured (ATen's GroupNorm and upsampling under compile, gradients in any
    layout, inductor's default reads threshold), so one run can time the changes since."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch._inductor.config as inductor_config
    from train_throughput import EXPERIMENTS, VARIANTS

    from ddpm_lightning.accel.compile import TRAINING_INDUCTOR_OPTIONS
    from ddpm_lightning.models import grad_layout, layers, unet

    upsample_nearest = layers.upsample_nearest
    assert TRAINING_INDUCTOR_OPTIONS == {"realize_reads_threshold": 6}
    with EXPERIMENTS["+reads4"]():
        assert TRAINING_INDUCTOR_OPTIONS == {"realize_reads_threshold": 4}
    from ddpm_lightning.accel import TrainStep

    with EXPERIMENTS["+autocast-weights"]():
        assert not TrainStep.hold_weights
    assert TrainStep.hold_weights
    with EXPERIMENTS["+channel-stats"]():
        assert layers.GroupNorm32.channel_statistics and TrainStep.hold_weights
    assert not layers.GroupNorm32.channel_statistics
    before = inductor_config.combo_kernels, inductor_config.coordinate_descent_tuning
    with EXPERIMENTS["+combo"]():
        assert inductor_config.combo_kernels and not inductor_config.coordinate_descent_tuning
    assert (inductor_config.combo_kernels, inductor_config.coordinate_descent_tuning) == before == (False, False)
    # +cdt is the module's own option, set on the command line like the variants' other options.
    assert VARIANTS["bf16-cl-compile-graph+cdt"] == VARIANTS["bf16-cl-compile-graph"] + ["--model.compile_tuning=true"]
    assert TRAINING_INDUCTOR_OPTIONS == {"realize_reads_threshold": 6}

    calls = []
    monkeypatch.setattr(layers, "group_norm", lambda x, *a, **k: calls.append(1) or x)
    norm, x = layers.GroupNorm32(2, 8), torch.randn(2, 8, 4, 4)
    with EXPERIMENTS["+aten-gn"]():
        assert TRAINING_INDUCTOR_OPTIONS == {"realize_reads_threshold": 4}
        assert unet.keep_grad_layout(x) is x and layers.keep_grad_layout is not grad_layout.keep_grad_layout
        assert layers.upsample_nearest is not upsample_nearest
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(norm, backend="aot_eager")(x), norm(x))
        assert calls == []
    assert unet.keep_grad_layout is grad_layout.keep_grad_layout and layers.keep_grad_layout is grad_layout.keep_grad_layout
    assert layers.upsample_nearest is upsample_nearest
    torch._dynamo.reset()
    torch.compile(norm, backend="aot_eager")(x)
    assert calls


def test_the_layout_report_names_a_weight_whose_gradient_arrives_in_another_layout():
    """A weight stored column-major whose consumer makes it row-major: autograd copies its gradient every step."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_throughput import StepTimer

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(5))
            self.weight = torch.nn.Parameter(torch.randn(5, 3).t())  # shape (3, 5), strides (1, 3)

        def forward(self, x):
            return x @ self.weight.contiguous() + self.bias

    # The step runs on TrainStep's held copy (made at step 0) from step 1: its weights take autograd's gradients.
    net, float32_net = Net(), Net()
    timer = StepTimer(warmup=3, steps=1, report_layouts=True)
    module = SimpleNamespace(net=float32_net)
    timer.on_train_start(None, module)
    module._train_step = SimpleNamespace(held=SimpleNamespace(net=net))
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    timer.on_train_batch_start(SimpleNamespace(global_step=1, strategy=cpu), module, None, 0)
    float32_net(torch.randn(4, 3)).sum().backward()
    assert timer.probe.grad_strides == {}  # no longer probed
    net(torch.randn(4, 3)).sum().backward()
    trainer = SimpleNamespace(global_step=3, strategy=cpu)
    timer.on_train_batch_start(trainer, module, None, 0)
    assert timer.layout_mismatches == [{"param": "weight", "shape": [3, 5], "param_stride": [1, 3],
                                        "grad_stride": [5, 1]}]
    timer.probe.grad_strides.clear()  # the hooks are gone once timing starts
    net(torch.randn(4, 3)).sum().backward()
    assert timer.probe.grad_strides == {}


def test_a_sampling_variants_suffix_sets_its_setting_for_that_variant_only(monkeypatch):
    """+bench turns cuDNN's autotuner on; +one-kernel-gn compiles sampling's GroupNorm through group_norm_act
    (statistics and output in one kernel) where the default takes two passes, so one run can time the two;
    +channel-stats takes GroupNorm's statistics from per-channel ones; +combo turns on inductor's combo kernels;
    +autocast-weights leaves a UNet's weights to autocast's casts at every call; +cdt sets the module's
    compile_tuning. Suffixes combine; a name that is not a base and suffixes is refused in one line that lists
    them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch._inductor.config as inductor_config
    from sample_throughput import variant_context, variant_name, variant_options

    from ddpm_lightning.accel import FastForward
    from ddpm_lightning.diffusion import SeededNoise
    from ddpm_lightning.models import build_unet, layers

    calls = []
    monkeypatch.setattr(layers, "group_norm_act", lambda *a, **k: calls.append(1) or a[0])
    norm = layers.GroupNorm32(2, 8)
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    benchmark = torch.backends.cudnn.benchmark
    assert variant_options("bf16-cl-compile-graph+one-kernel-gn") == variant_options("bf16-cl-compile-graph")
    with torch.no_grad():
        with variant_context("bf16-cl-compile-graph+one-kernel-gn"):
            assert not torch.backends.cudnn.benchmark
            torch.compile(norm, backend="aot_eager")(x)
            assert calls == [1]
        with variant_context("bf16-cl-compile-graph+bench"):
            assert torch.backends.cudnn.benchmark and not inductor_config.combo_kernels
            torch.compile(norm, backend="aot_eager")(x)
            assert calls == [1]
        with variant_context("bf16-cl-compile-graph+combo"):
            assert inductor_config.combo_kernels and not torch.backends.cudnn.benchmark
            assert not layers.GroupNorm32.one_kernel_sampling and FastForward.hold_weights
        with variant_context("bf16-cl-compile-graph+autocast-weights"):
            assert not FastForward.hold_weights and not inductor_config.combo_kernels
            assert not layers.GroupNorm32.channel_statistics
            assert FastForward(build_unet("tiny", image_size=8, in_channels=1), "bf16-mixed").held is None
        with variant_context(variant_name("bf16-cl-compile-graph+channel-stats+cdt")):
            assert layers.GroupNorm32.channel_statistics and not layers.GroupNorm32.one_kernel_sampling
            assert FastForward.hold_weights and not inductor_config.combo_kernels and SeededNoise.compiled_draws
        with variant_context(variant_name("bf16-cl-compile-graph+eager-noise")):
            assert not SeededNoise.compiled_draws and FastForward.hold_weights
            assert not layers.GroupNorm32.channel_statistics
        assert variant_options("bf16-cl-compile-graph+cdt") == {**variant_options("bf16-cl-compile-graph"),
                                                                "compile_tuning": True}
        assert "compile_tuning" not in variant_options("bf16-cl-compile-graph+combo")
        calls.clear()
        cdt_gn = variant_name("bf16-cl-compile-graph+cdt+one-kernel-gn")
        assert variant_options(cdt_gn)["compile_tuning"]
        with variant_context(cdt_gn):
            assert layers.GroupNorm32.one_kernel_sampling and not inductor_config.combo_kernels
            assert not torch.backends.cudnn.benchmark and FastForward.hold_weights
            torch.compile(norm, backend="aot_eager")(x)
            assert calls == [1]
    assert torch.backends.cudnn.benchmark == benchmark and not layers.GroupNorm32.one_kernel_sampling
    assert not layers.GroupNorm32.channel_statistics
    assert not inductor_config.combo_kernels and not inductor_config.coordinate_descent_tuning
    assert FastForward.hold_weights and SeededNoise.compiled_draws
    for bad in ("bf16-cl-compile-graph+fast", "bf16-cl-compile-graph+cdt+cdt", "bf16-cl-compiled"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"unknown variant .* suffixes \+bench"):
            variant_name(bad)


def test_sample_throughput_compares_each_fast_path_with_fp32(tmp_path):
    record, stdout = run("sample_throughput.py", tmp_path, "--preset", "tiny", "--image_size", "8", "--in_channels",
                         "1", "--batch_size", "4", "--respacing", "3", "--num_batches", "1", "--variants", "fp32",
                         "bf16-cl-graph", "fp32+bench", "fp32+one-kernel-gn", "--diffusers", "bf16-cl", "--profile_dir",
                         str(tmp_path))
    results = record["results"]
    assert "Self CPU" in (tmp_path / "profile-sample-fp32.txt").read_text()
    # beside it, device time by kernel for inductor_report.py --kernel_times (none on a CPU)
    assert json.loads((tmp_path / "profile-sample-fp32.json").read_text()) == {}
    assert results["fp32"]["rel_error"] == 0.0
    assert results["bf16-cl-graph"]["noise_max_diff"] == 0.0  # not compiled: the sampling noise is the eager draw
    # +bench: the same variant, timed with cuDNN's autotuner on, and only that one
    assert results["fp32+bench"]["cudnn_benchmark"] and not results["fp32"]["cudnn_benchmark"]
    assert results["fp32+bench"]["rel_error"] == 0.0
    assert results["fp32+one-kernel-gn"]["rel_error"] == 0.0  # eager, as on every CPU: the same ops
    assert 0 < results["bf16-cl-graph"]["rel_error"] < 3e-2  # bf16 rounding, not a different function
    assert results["diffusers bf16-cl"]["images_per_s"] > 0
    assert all(results[name]["warmup_s"] > 0 for name in ("fp32", "bf16-cl-graph"))  # what an evaluation pays once
    order = [line.split(":")[0] for line in stdout.splitlines() if line.startswith("[sample]")]
    assert order[:3] == ["[sample] fp32", "[sample] diffusers bf16-cl", "[sample] bf16-cl-graph"]


def test_fid_throughput_projects_50k(tmp_path):
    record, stdout = run("fid_throughput.py", tmp_path, "--preset", "tiny", "--image_size", "8", "--in_channels", "1",
                         "--variant", "fp32+bench", "--num_samples", "8", "--batch_size", "4", "--respacing", "3")
    result = record["results"]
    assert result["num_samples"] == 8 and 0 < result["inception_seconds"] and result["cudnn_benchmark"]
    assert result["seconds_for_50k"] == result["seconds"] * 50_000 / 8 and result["warmup_seconds"] > 0


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler on a CPU")
def test_inductor_code_is_written_per_compiled_graph_under_its_label(tmp_path):
    """What lets a GPU profile's kernel names be read back on a machine without a GPU."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from torch._inductor.graph import GraphLowering

    from bench_common import InductorCode

    code = InductorCode(str(tmp_path / "code.py"))
    try:
        code.label = "variant a"
        torch.compile(lambda x: (x * 2).sin(), dynamic=False)(torch.randn(5))
        code.label = "variant b"
        torch.compile(lambda x: x.cos() + 1, dynamic=False)(torch.randn(3))
        code.label = "variant a again"  # the same graph, compiled anew or loaded from inductor's cache
        torch.compile(lambda x: (x * 2).sin(), dynamic=False)(torch.randn(5))
    finally:
        GraphLowering.save_output_code = None
    text = (tmp_path / "code.py").read_text()
    assert "# ===== variant a: graph 1\n" in text and "# ===== variant b: graph 2\n" in text
    assert text.endswith("# ===== variant a again: the code of graph 1\n")
    assert text.count("def call(") == 2  # each graph's wrapper, kernels included


SYNTHETIC_WRAPPER = """
# ===== train demo: graph 1
from ctypes import c_void_p
triton_poi_fused_add_0 = async_compile.triton('triton_poi_fused_add_0', '''
@triton.jit
def triton_poi_fused_add_0(in_ptr0, out_ptr0, xnumel, XBLOCK):
    inductor_meta={'kernel_name': 'triton_poi_fused_add_0', 'kernel_num_gb': 0.134}
def call(args):
    triton_poi_fused_add_0.run(*args, stream=stream0)
''', device_str='cuda')
triton_red_fused_native_group_norm_1 = async_compile.triton('triton_red_fused_native_group_norm_1', '''
    inductor_meta={'kernel_name': 'triton_red_fused_native_group_norm_1', 'kernel_num_gb': 0.067}
''', device_str='cuda')
triton_poi_fused__to_copy_2 = async_compile.triton('triton_poi_fused__to_copy_2', '''
    inductor_meta={'kernel_name': 'triton_poi_fused__to_copy_2', 'kernel_num_gb': 0.0001}
''', device_str='cuda')
def call(args):
    primals_1, primals_2, tangents_1 = args
    assert_size_stride(primals_1, (8, 4, 2, 2), (16, 1, 8, 4))
    assert_size_stride_grouped((primals_2, tangents_1), ((4, 4, 3, 3), (8, 4, 2, 2)), ((36, 1, 12, 4), (16, 1, 8, 4)), 'input')
    buf0 = empty_strided_cuda((8, 4, 2, 2), (16, 4, 2, 1), torch.bfloat16)
    triton_poi_fused_add_0.run(tangents_1, buf0, 128, stream=stream0)
    triton_poi_fused_add_0.run(tangents_1, buf0, 128, stream=stream0)
    triton_red_fused_native_group_norm_1.run(buf0, 8, stream=stream0)
    triton_poi_fused__to_copy_2.run(primals_2, 8, stream=stream0)
    buf1 = torch.ops.aten.convolution_backward.default(buf0, primals_1, primals_2, [4], (1, 1), (1, 1), (1, 1), False, (0, 0), 1, [True, True, False])
    buf2 = buf1[1]
    assert_tensor_metadata(buf2, (4, 4, 3, 3), (36, 1, 12, 4), torch.bfloat16, 'op')
    # extern_kernels.convolution_backward(buf0, primals_1, primals_2) in a comment is not a call
    buf3 = extern_kernels.convolution_backward(tangents_1, primals_1, reinterpret_tensor(buf2, (4, 4, 3, 3), (36, 1, 12, 4), 0), [4])
    return (buf2, )
"""


def test_inductor_report_counts_traffic_and_flags_layout_copies(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from inductor_report import analyse_wrapper, layout_name, print_report, split_graphs

    graphs = split_graphs(SYNTHETIC_WRAPPER)
    assert [label for label, _ in graphs] == ["train demo: graph 1"]
    report = analyse_wrapper(graphs[0][1], graphs[0][0])
    # the two launches in `call`, not the one in the kernel's own benchmark harness
    assert report.launches == {"other elementwise": 2, "GroupNorm statistics": 1, "launches under 2 MB": 1}
    assert report.total_bytes == pytest.approx((2 * 0.134 + 0.067 + 0.0001) * 1e9)
    assert report.extern == {"convolution_backward": 2}
    # a row-major gradient for a channels_last input is copied; a channels_last one is not
    assert report.conv_backward == {("NCHW", "CL", "CL"): 1, ("CL", "CL", "CL"): 1}
    # the batch-8 image buffers (the weights lead with 4): two channels_last inputs, one NCHW gradient
    assert report.activations == {"CL": 2, "NCHW": 1}
    print_report([report], bandwidth=1e12)
    out = capsys.readouterr().out
    assert "0.34 ms at 1.00 TB/s" in out and "ATen copies the gradient into CL" in out
    # code generated on a GPU without inductor's byte counts says so, instead of reporting 0 GB
    real = analyse_wrapper(graphs[0][1].replace("'kernel_num_gb'", "'other'"), "gpu")
    assert not real.bytes_known and real.launches["GroupNorm statistics"] == 1
    print_report([real], bandwidth=1e12)
    assert "4 Triton launches, bytes unknown" in capsys.readouterr().out
    assert layout_name((8, 1, 2, 2), (4, 4, 2, 1)) == "either" and layout_name((8, 4, 2, 2), (32, 1, 16, 8)).startswith("strides")


def test_inductor_report_joins_a_profiles_kernel_times_with_the_codes_bytes(tmp_path):
    """--kernel_times: each kernel's device time in a profile of 10 calls of the graph (write_profile's JSON, by
    name), per call of the graph, against the bytes the code says it moves: time and bandwidth per category."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from inductor_report import kernel_times

    times = {"triton_poi_fused_add_0": {"calls": 20, "device_us": 2680.0},  # 2 launches a call, 134 us each
             "triton_red_fused_native_group_norm_1": {"calls": 10, "device_us": 670.0},
             "aten::mm": {"calls": 10, "device_us": 500.0}, "triton_poi_fused__to_copy_2": {"calls": 10, "device_us": 9.0}}
    rows, calls = kernel_times(SYNTHETIC_WRAPPER, times)
    assert calls == 10 and [row.name for row in rows][:2] == ["triton_poi_fused_add_0", "triton_red_fused_native_group_norm_1"]
    add, stats = rows[:2]
    assert (add.launches, add.category, add.bytes) == (2, "other elementwise", pytest.approx(0.134e9))
    assert add.seconds == pytest.approx(268e-6) and stats.seconds == pytest.approx(67e-6)
    assert stats.category == "GroupNorm statistics" and stats.bytes / stats.seconds == pytest.approx(1e12)
    assert kernel_times(SYNTHETIC_WRAPPER, {"aten::mm": times["aten::mm"]}) == ([], 0.0)

    # A variant's second graph (sampling's: the seeded noise draw, 101 calls a batch) is joined on its own.
    noise_graph = """
# ===== train demo: graph 2
triton_poi_fused_stack_0 = async_compile.triton('triton_poi_fused_stack_0', '''
    inductor_meta={'kernel_name': 'triton_poi_fused_stack_0', 'kernel_num_gb': 0.0126}
''', device_str='cuda')
def call(args):
    triton_poi_fused_stack_0.run(buf0, 8, stream=stream0)
"""
    times["triton_poi_fused_stack_0"] = {"calls": 101, "device_us": 808.0}
    (tmp_path / "code.py").write_text(SYNTHETIC_WRAPPER + noise_graph)
    (tmp_path / "times.json").write_text(json.dumps(times))
    script = [sys.executable, str(ROOT / "benchmarks" / "inductor_report.py"), str(tmp_path / "code.py"),
              "--kernel_times", str(tmp_path / "times.json")]
    out = subprocess.run(script + ["--graph", "train demo:"], capture_output=True, text=True, check=True).stdout
    assert "train demo: graph 1: Triton kernels timed in 10 calls of the graph" in out
    assert re.search(r"other elementwise +2 +0\.27 +0\.27 +1\.00", out), out
    assert re.search(r"all Triton kernels +4 +0\.34 +0\.34 ", out), out
    assert "train demo: graph 2: Triton kernels timed in 101 calls of the graph" in out
    assert re.search(r"all Triton kernels +1 +0\.01 +0\.01 +1\.57", out), out  # 12.6 MB in 8 us
    wrong = subprocess.run(script + ["--graph", "sample"], capture_output=True, text=True)
    assert wrong.returncode != 0 and "names no graph; labels: train demo: graph 1; train demo: graph 2" in wrong.stderr


def test_inductor_report_tells_a_one_pass_groupnorm_from_its_statistics():
    """A reduction kernel that also stores at the reduced index writes the normalised output too."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from inductor_report import _category

    name = "triton_red_fused__to_copy_add_mul_neg_permute_rsqrt_silu_var_mean_view_17"
    stats = "    tl.store(out_ptr0 + (x4), tmp2, None)\n"
    one_pass = stats + "        tl.store(out_ptr3 + (r0_2 + 4*x0 + 128*r0_3 + 32768*x1), tmp29, r0_mask)\n"
    assert _category(name, 5e8, one_pass) == "GroupNorm in one pass"
    assert _category(name, 5e8, stats) == "GroupNorm statistics"
    assert _category("triton_poi_fused_add_mul_rsqrt_silu_1", 5e8, one_pass) == "GroupNorm application"
    assert _category(name, 1e3, one_pass) == "launches under 2 MB"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sample", "train"])
def test_offline_cuda_codegen_lowers_the_unet_for_an_h100_without_a_gpu(kind):
    """Inductor's CUDA wrapper for the tiny UNet, generated on this CPU: every convolution is a cuDNN call
    with known layouts, the Triton kernels move bytes, and (training) no weight gets its gradient in
    another layout, and the forward writes no NCHW activation under channels_last (with ATen's GroupNorm it
    wrote an NCHW copy of each normalised one, which the backward's convolutions then copied back), and no
    convolution backward gets a gradient cuDNN must copy (the skip concatenation's slices did), and nearest
    upsampling's backward sums blocks instead of scattering with atomics."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from inductor_report import analyse_wrapper, split_graphs
    from offline_cuda_codegen import sampling_forward_code, training_step_code

    from ddpm_lightning.models import build_unet

    net = build_unet("tiny", image_size=8, in_channels=3)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    grad_layouts: list = []
    if kind == "sample":
        codes = sampling_forward_code(net, 4, channels_last=True)
    else:
        codes = training_step_code(net, 4, channels_last=True, grad_layouts=grad_layouts)
    reports = [analyse_wrapper(code, label) for label, code in split_graphs("\n".join(codes))]
    assert len(reports) == (1 if kind == "sample" else 2)
    assert all("cuda" in code and "triton" in code for code in codes)
    assert reports[0].extern["convolution"] == convs and reports[0].total_bytes > 4 * 3 * 8 * 8 * 4
    # Attention's qkv projection stays one matrix product, not a batched one over a broadcast weight.
    assert "bmm" not in reports[0].extern
    if kind == "train":
        assert reports[0].activations["CL"] > 0 and reports[0].activations["NCHW"] == 0, reports[0].activations
        assert reports[1].extern["convolution_backward"] == convs and grad_layouts == []
        assert sum(reports[1].conv_backward.values()) == convs
        assert not any("unknown" in key for key in reports[1].conv_backward)
        assert all(grad in ("CL", "either") and inp in ("CL", "either")
                   for grad, inp, _ in reports[1].conv_backward), reports[1].conv_backward
        assert "tl.atomic_add(" not in "\n".join(codes)


@pytest.mark.slow
def test_the_training_compiles_inductor_options_cut_the_backwards_bytes():
    """TRAINING_INDUCTOR_OPTIONS (realize_reads_threshold 6, what `ddpm fit` compiles the training network
    with) let each of GroupNorm's two backward kernels recompute GroupNorm's output, which reads 5 buffers,
    instead of writing it out in fp32 and reading it back: the tiny UNet's offline backward moves fewer bytes
    than with inductor's defaults (the DDPM CIFAR-10 net's a third fewer) in about as many launches, and the
    forward moves the same bytes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from inductor_report import analyse_wrapper, split_graphs
    from offline_cuda_codegen import training_step_code

    from ddpm_lightning.models import build_unet

    reports = {}
    for name, options in (("training", None), ("defaults", {})):
        net = build_unet("tiny", image_size=8, in_channels=3)
        codes = training_step_code(net, 4, channels_last=True, inductor_options=options)
        reports[name] = [analyse_wrapper(code, label) for label, code in split_graphs("\n".join(codes))]
    (forward, backward), (forward0, backward0) = reports["training"], reports["defaults"]
    assert forward.total_bytes == forward0.total_bytes
    assert backward.total_bytes < 0.97 * backward0.total_bytes, (backward.total_bytes, backward0.total_bytes)
    assert sum(backward.launches.values()) <= sum(backward0.launches.values()) + 1


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [True, False])
def test_one_kernel_groupnorm_compiles_to_no_more_traffic_than_two_passes(monkeypatch, channels_last):
    """The one-kernel GroupNorm (group_norm_act: the norm, scale-shift and SiLU on a channels_last grouping;
    sample_throughput's +one-kernel-gn) against the two-pass form sampling takes by default: inductor's offline
    code for the tiny UNet moves no more bytes in no more launches, channels_last or NCHW (which GroupNorm32
    leaves in two passes: for this net in NCHW, either grouping moved more bytes). With torch 2.11's inductor,
    which fuses a group's statistics with its output, a channels_last net's code moves fewer bytes and
    computes more GroupNorms in one pass (the DDPM CIFAR-10 net's sampling graph 23% fewer bytes); torch 2.14's
    loop reordering turns that fusion down, and its code for the two forms is the same. Fewer bytes did not
    make it faster on an H100 (GPU run 3), which is why it is not the default."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import inductor_report
    from offline_cuda_codegen import sampling_forward_code
    from sample_throughput import variant_context

    from ddpm_lightning.models import build_unet

    monkeypatch.setattr(inductor_report, "TINY_BYTES", 0)  # categories at the tiny net's sizes
    reports = {}
    for name in ("bf16-cl-compile-graph+one-kernel-gn", "bf16-cl-compile-graph"):
        with variant_context(name):
            codes = sampling_forward_code(build_unet("tiny", image_size=16, in_channels=3), 16, channels_last)
        reports[name] = inductor_report.analyse_wrapper("\n".join(codes), name)
    one_kernel, two_pass = reports.values()
    assert one_kernel.total_bytes <= two_pass.total_bytes, (one_kernel.total_bytes, two_pass.total_bytes)
    assert sum(one_kernel.launches.values()) <= sum(two_pass.launches.values())
    if channels_last and torch.__version__ < "2.14":
        assert one_kernel.total_bytes < 0.99 * two_pass.total_bytes, (one_kernel.total_bytes, two_pass.total_bytes)
        assert one_kernel.launches["GroupNorm in one pass"] > two_pass.launches["GroupNorm in one pass"]


@pytest.mark.slow
def test_channel_statistics_cut_the_training_forwards_bytes(monkeypatch):
    """GroupNorm32.channel_statistics (train_throughput's and sample_throughput's +channel-stats): each group's
    statistics from per-channel reductions, which read whole pixels of a channels_last activation and fuse
    into the kernels that write it. The tiny UNet's offline training forward moves at least 3% fewer bytes
    (6% with torch 2.11 and 2.14; the DDPM CIFAR-10 net's 16% with 2.11), and the backward, which reads
    the saved mean and 1/std either way, the same."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from inductor_report import analyse_wrapper, split_graphs
    from offline_cuda_codegen import training_step_code

    from ddpm_lightning.models import build_unet, layers

    reports = {}
    for on in (False, True):
        monkeypatch.setattr(layers.GroupNorm32, "channel_statistics", on)
        codes = training_step_code(build_unet("tiny", image_size=16, in_channels=3), 16, channels_last=True)
        reports[on] = [analyse_wrapper(code, label) for label, code in split_graphs("\n".join(codes))]
    (forward0, backward0), (forward, backward) = reports[False], reports[True]
    assert forward.total_bytes < 0.97 * forward0.total_bytes, (forward.total_bytes, forward0.total_bytes)
    assert backward.total_bytes == backward0.total_bytes


def test_run_gpu_sh_names_only_variants_the_scripts_know():
    """A misspelt default in run_gpu.sh would cost a device run its variant; each name must parse."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sample_throughput
    import train_throughput

    script = (ROOT / "benchmarks" / "run_gpu.sh").read_text()

    def defaults(variable):
        return re.search(r"\$\{" + variable + r":-([^}]*)\}", script).group(1).split()

    assert "bf16-cl-compile-graph+cdt" in defaults("TRAIN_VARIANTS")
    assert all(name in train_throughput.VARIANTS for name in defaults("TRAIN_VARIANTS"))
    for name in defaults("SAMPLE_VARIANTS") + defaults("SAMPLE_BIG_VARIANTS") + defaults("FID_VARIANT"):
        sample_throughput.variant_name(name)
    assert set(defaults("TRAIN_DIFFUSERS")) <= set(train_throughput.DIFFUSERS_MODES)
    assert set(defaults("SAMPLE_DIFFUSERS")) <= set(sample_throughput.DIFFUSERS_MODES)
