"""Checkpoint import: diffusers UNet2DModel (Ho et al., 2020) and improved-diffusion (Nichol & Dhariwal, 2021)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ddpm_lightning.models import PRESETS, UNet, build_unet, convert_diffusers, from_hub, import_weights

diffusers = pytest.importorskip("diffusers")

# google/ddpm-cifar10-32's UNet2DModel config (Ho et al. CIFAR-10 model), minus bookkeeping keys.
DDPM_CIFAR10_DIFFUSERS = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32,
)  # fmt: skip


def _diffusers_unet(seed: int = 0, **config) -> torch.nn.Module:
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(**config).eval()


def test_ddpm_cifar10_state_dict_matches_diffusers_outputs():
    reference = _diffusers_unet(**DDPM_CIFAR10_DIFFUSERS)
    net = import_weights(reference.state_dict(), "diffusers").eval()
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in reference.parameters()) == 35_746_307
    assert net.config == {**build_unet("ddpm_cifar10").config, "dropout": 0.0, "num_head_channels": None}
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 977])
    with torch.no_grad():
        expected, actual = reference(x, t).sample, net(x, t)
    assert expected.abs().mean() > 0.1  # diffusers' random init leaves the output non-trivial
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_ddpm_cifar10_config_json_reads_as_the_preset():
    # google/ddpm-cifar10-32/config.json as published (it sets attention_head_dim to null: one head).
    config = {"_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu",
              "center_input_sample": False, "mid_block_scale_factor": 1, "time_embedding_type": "positional",
              **DDPM_CIFAR10_DIFFUSERS}  # fmt: skip
    with torch.device("meta"):
        net = UNet(**convert_diffusers.unet_kwargs(config, {}, {"dropout": 0.1}))
        assert net.config == build_unet("ddpm_cifar10").config
    with pytest.raises(ValueError, match="unsupported diffusers setting center_input_sample=True"):
        convert_diffusers.unet_kwargs({**config, "center_input_sample": True}, {}, {})


# A small config that moves every setting away from DDPM's: multi-head, scale-shift, classes, learn_sigma.
SMALL_ADM_DIFFUSERS = dict(
    sample_size=16, in_channels=3, out_channels=6, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=16, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5,
    resnet_time_scale_shift="scale_shift", attn_norm_num_groups=32, num_class_embeds=5,
)  # fmt: skip


def test_diffusers_folder_round_trip(tmp_path):
    reference = _diffusers_unet(**SMALL_ADM_DIFFUSERS)
    reference.save_pretrained(tmp_path)
    net = import_weights(tmp_path, "diffusers").eval()
    assert (net.learn_sigma, net.num_classes, net.image_size, net.out_channels) == (True, 5, 16, 6)
    assert net.mid_block[1].num_heads == 4
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 700.0]), torch.tensor([1, 4])
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, y), reference(x, t, y).sample, atol=1e-5, rtol=0)


def test_single_files_and_from_hub_read_the_same_weights(tmp_path, monkeypatch):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    reference = _diffusers_unet(**SMALL_ADM_DIFFUSERS)
    state_dict = reference.state_dict()
    reference.save_pretrained(tmp_path / "model", safe_serialization=False)  # a .bin folder
    safetensors_torch.save_file(state_dict, tmp_path / "weights.safetensors")
    torch.save(state_dict, tmp_path / "weights.bin")
    expected = import_weights(tmp_path / "model", "diffusers").state_dict()
    for path in ("weights.safetensors", "weights.bin"):
        loaded = import_weights(tmp_path / path, "diffusers", image_size=16, num_head_channels=16).state_dict()
        assert all(torch.equal(loaded[key], expected[key]) for key in expected)
    # from_hub only downloads when called; here the download is replaced by the local folder.
    requested = []
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, **kw: requested.append(repo_id) or tmp_path / "model")
    assert from_hub("google/ddpm-tiny").state_dict().keys() == expected.keys() and requested == ["google/ddpm-tiny"]


def test_diffusers_legacy_attention_names_import_identically():
    # google/ddpm-* .bin files predate diffusers' to_q/to_k/to_v/to_out names.
    reference = _diffusers_unet(**SMALL_ADM_DIFFUSERS)
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    legacy = {}
    for key, tensor in reference.state_dict().items():
        for new, old in renames.items():
            key = key.replace(new, old)
        legacy[key] = tensor
    assert any(".query." in key for key in legacy)
    overrides = dict(image_size=16, num_head_channels=16, flip_sin_to_cos=True, freq_shift=0,
                     downsample_padding="symmetric", norm_eps=1e-5)  # fmt: skip
    net = import_weights(legacy, "diffusers", **overrides).eval()
    x, t, y = torch.randn(1, 3, 16, 16), torch.tensor([42]), torch.tensor([2])
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, y), reference(x, t, y).sample, atol=1e-5, rtol=0)


def test_import_is_strict_about_missing_and_unmapped_keys():
    state_dict = _diffusers_unet(**SMALL_ADM_DIFFUSERS).state_dict()
    missing = dict(state_dict)
    del missing["down_blocks.1.attentions.0.to_k.bias"]
    with pytest.raises(
        ValueError, match=r"attentions\.0\.to_q\.bias \(no k to fuse into down_blocks\.2\.1\.qkv\.bias\)"
    ):
        import_weights(missing, "diffusers", image_size=16)
    extra = {**state_dict, "mystery.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"unmapped checkpoint keys: mystery\.weight"):
        import_weights(extra, "diffusers", image_size=16)
    with pytest.raises(ValueError, match="valid kinds: diffusers, iddpm"):
        import_weights(state_dict, "ldm")


# --- improved-diffusion (Nichol & Dhariwal) -------------------------------------------------------
# The state dict below uses improved-diffusion's names and shapes; the reference forward pass
# re-implements its UNetModel with functional ops, including the legacy per-head QKV order.


def adm_checkpoint(in_channels, base, mult, num_res_blocks, attention_ds, scale_shift, num_classes,
                   learn_sigma, fill=torch.randn, updown=False):  # fmt: skip
    """(state dict in improved-diffusion's layout, block plan for the reference forward)."""
    emb = 4 * base
    state: dict[str, Tensor] = {}

    def param(name, *shape, scale=0.2, offset=0.0):
        state[name] = fill(*shape) * scale + offset

    def conv(name, cin, cout, k=3, dims=2):
        param(name + ".weight", cout, cin, *([k] * dims), scale=1 / math.sqrt(cin * k**dims))
        param(name + ".bias", cout, scale=0.1)

    def norm(name, channels):
        param(name + ".weight", channels, scale=0.1, offset=1.0)
        param(name + ".bias", channels, scale=0.1)

    def res(prefix, cin, cout, kind="res"):
        norm(f"{prefix}.in_layers.0", cin), conv(f"{prefix}.in_layers.2", cin, cout)
        param(f"{prefix}.emb_layers.1.weight", cout * (2 if scale_shift else 1), emb, scale=emb**-0.5)
        param(f"{prefix}.emb_layers.1.bias", cout * (2 if scale_shift else 1), scale=0.1)
        norm(f"{prefix}.out_layers.0", cout), conv(f"{prefix}.out_layers.3", cout, cout)
        if cin != cout:
            conv(f"{prefix}.skip_connection", cin, cout, k=1)
        return (kind, prefix, cin, cout)

    def attn(prefix, channels):
        norm(f"{prefix}.norm", channels), conv(f"{prefix}.qkv", channels, 3 * channels, 1, 1)
        conv(f"{prefix}.proj_out", channels, channels, 1, 1)
        return ("attn", prefix)

    conv("time_embed.0", base, emb, 1, 0), conv("time_embed.2", emb, emb, 1, 0)
    for name in ("time_embed.0", "time_embed.2"):
        state[name + ".weight"] = state[name + ".weight"].reshape(emb, -1)
    if num_classes:
        param("label_emb.weight", num_classes, emb, scale=1.0)
    conv("input_blocks.0.0", in_channels, base)
    inputs, chans, ch, ds = [], [base], base, 1
    for level, m in enumerate(mult):
        for _ in range(num_res_blocks):
            block = [res(f"input_blocks.{len(inputs) + 1}.0", ch, base * m)]
            ch = base * m
            if ds in attention_ds:
                block.append(attn(f"input_blocks.{len(inputs) + 1}.1", ch))
            inputs.append(block), chans.append(ch)
        if level != len(mult) - 1 and updown:  # guided-diffusion's resblock_updown
            inputs.append([res(f"input_blocks.{len(inputs) + 1}.0", ch, ch, "resdown")]), chans.append(ch)
            ds *= 2
        elif level != len(mult) - 1:
            conv(f"input_blocks.{len(inputs) + 1}.0.op", ch, ch)
            inputs.append([("down", f"input_blocks.{len(inputs) + 1}.0.op")]), chans.append(ch)
            ds *= 2
    middle = [res("middle_block.0", ch, ch), attn("middle_block.1", ch), res("middle_block.2", ch, ch)]
    outputs = []
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(num_res_blocks + 1):
            k = len(outputs)
            block = [res(f"output_blocks.{k}.0", ch + chans.pop(), base * m)]
            ch = base * m
            if ds in attention_ds:
                block.append(attn(f"output_blocks.{k}.1", ch))
            if level and i == num_res_blocks and updown:
                block.append(res(f"output_blocks.{k}.{len(block)}", ch, ch, "resup"))
                ds //= 2
            elif level and i == num_res_blocks:
                conv(f"output_blocks.{k}.{len(block)}.conv", ch, ch)
                block.append(("up", f"output_blocks.{k}.{len(block)}.conv"))
                ds //= 2
            outputs.append(block)
    norm("out.0", ch), conv("out.2", base, in_channels * (2 if learn_sigma else 1))
    plan = dict(inputs=inputs, middle=middle, outputs=outputs, scale_shift=scale_shift, base=base)
    return state, plan


def adm_forward(state, plan, x, t, y=None, num_heads=4):
    """improved-diffusion's UNetModel.forward, written out with functional ops."""

    def gn(h, name):
        return F.group_norm(h, 32, state[name + ".weight"], state[name + ".bias"], eps=1e-5)

    def conv(h, name, **kw):
        op = F.conv1d if state[name + ".weight"].ndim == 3 else F.conv2d
        return op(h, state[name + ".weight"], state[name + ".bias"], **kw)

    def layer(kind, prefix, *channels):
        def run(h, emb):
            if kind == "down":
                return conv(h, prefix, stride=2, padding=1)
            if kind == "up":
                return conv(F.interpolate(h, scale_factor=2, mode="nearest"), prefix, padding=1)
            if kind.startswith("res"):
                out = F.silu(gn(h, f"{prefix}.in_layers.0"))
                if kind != "res":  # resample both paths between in_layers[:-1] and in_layers[-1]
                    resample = (lambda z: F.avg_pool2d(z, 2)) if kind == "resdown" else (
                        lambda z: F.interpolate(z, scale_factor=2, mode="nearest"))  # fmt: skip
                    out, h = resample(out), resample(h)
                out = conv(out, f"{prefix}.in_layers.2", padding=1)
                e = F.linear(F.silu(emb), state[f"{prefix}.emb_layers.1.weight"], state[f"{prefix}.emb_layers.1.bias"])
                e = e[..., None, None]
                if plan["scale_shift"]:
                    scale, shift = e.chunk(2, dim=1)
                    out = gn(out, f"{prefix}.out_layers.0") * (1 + scale) + shift
                else:
                    out = gn(out + e, f"{prefix}.out_layers.0")
                out = conv(F.silu(out), f"{prefix}.out_layers.3", padding=1)
                skip = conv(h, f"{prefix}.skip_connection") if channels[0] != channels[1] else h
                return skip + out
            # AttentionBlock + QKVAttention (legacy order): heads split the 3C channels first.
            b, c, *spatial = h.shape
            flat = h.reshape(b, c, -1)
            qkv = conv(gn(flat, f"{prefix}.norm"), f"{prefix}.qkv").reshape(b * num_heads, -1, flat.shape[-1])
            q, k, v = qkv.split(qkv.shape[1] // 3, dim=1)
            s = 1 / math.sqrt(math.sqrt(q.shape[1]))
            weight = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
            a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, flat.shape[-1])
            return (flat + conv(a, f"{prefix}.proj_out")).reshape(b, c, *spatial)

        return run

    def block(h, layers, emb):
        for spec in layers:
            h = layer(*spec)(h, emb)
        return h

    half = plan["base"] // 2
    args = t[:, None].float() * torch.exp(-math.log(10000) * torch.arange(half) / half)[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    emb = F.linear(F.silu(F.linear(temb, state["time_embed.0.weight"], state["time_embed.0.bias"])),
                   state["time_embed.2.weight"], state["time_embed.2.bias"])  # fmt: skip
    if y is not None:
        emb = emb + state["label_emb.weight"][y]
    hs = [conv(x, "input_blocks.0.0", padding=1)]
    for layers in plan["inputs"]:
        hs.append(block(hs[-1], layers, emb))
    h = block(hs[-1], plan["middle"], emb)
    for layers in plan["outputs"]:
        h = block(torch.cat([h, hs.pop()], dim=1), layers, emb)
    return conv(F.silu(gn(h, "out.0")), "out.2", padding=1)


@pytest.mark.parametrize(
    "scale_shift,num_classes,learn_sigma,updown",
    [(True, 5, True, False), (False, None, False, False), (True, None, False, True)],
)
def test_iddpm_import_matches_reference_forward(scale_shift, num_classes, learn_sigma, updown):
    torch.manual_seed(0)
    state, plan = adm_checkpoint(3, 32, (1, 2, 2), 2, (2, 4), scale_shift, num_classes, learn_sigma, updown=updown)
    net = import_weights(state, "iddpm", image_size=16).eval()
    assert net.config["resblock_updown"] == updown
    assert net.config["channel_mult"] == (1, 2, 2) and net.config["num_res_blocks"] == 2
    assert net.config["attention_resolutions"] == (8, 4)
    assert (net.learn_sigma, net.num_classes, net.config["use_scale_shift_norm"]) == (
        learn_sigma,
        num_classes,
        scale_shift,
    )
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 3999])
    y = torch.tensor([0, 4]) if num_classes else None
    with torch.no_grad():
        expected, actual = adm_forward(state, plan, x, t, y), net(x, t, y)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_iddpm_head_count_changes_the_function():
    # With 4 heads in the checkpoint, reading it as 1 head must give a different network: the
    # per-head qkv reorder is real, not a no-op that a 1-head test would hide.
    torch.manual_seed(1)
    state, plan = adm_checkpoint(3, 32, (1, 2), 1, (2,), True, None, False)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    with torch.no_grad():
        expected = adm_forward(state, plan, x, t, num_heads=4)
        good = import_weights(state, "iddpm", image_size=8).eval()(x, t)
        wrong = import_weights(state, "iddpm", image_size=8, num_heads=1).eval()(x, t)
    torch.testing.assert_close(good, expected, atol=1e-5, rtol=1e-5)
    assert (wrong - expected).abs().max() > 1e-3


@pytest.mark.parametrize(
    "preset,mult,attention_ds", [("iddpm_cifar10", (1, 2, 2, 2), (2, 4)), ("iddpm_imagenet64", (1, 2, 3, 4), (4, 8))]
)
def test_iddpm_release_architectures_are_inferred(preset, mult, attention_ds, tmp_path):
    # Shapes of cifar10_uncond_50M_500K.pt / imagenet64_uncond_100M_1500K.pt (attention at 16 and 8).
    state, _ = adm_checkpoint(3, 128, mult, 3, attention_ds, True, None, True, fill=torch.zeros)
    if preset == "iddpm_cifar10":  # also read one from disk, as the released .pt files are
        torch.save(state, tmp_path / "model.pt")
    net = import_weights(tmp_path / "model.pt" if preset == "iddpm_cifar10" else state, "iddpm")
    assert net.config == {**PRESETS[preset], "dropout": 0.0, "num_head_channels": None, "num_classes": None,
                          "resblock_updown": False, "use_checkpoint": False, "norm_groups": 32}  # fmt: skip
    assert sum(p.numel() for p in net.parameters()) == sum(t.numel() for t in state.values())


def test_iddpm_unknown_size_and_wrong_layout_are_errors():
    state, _ = adm_checkpoint(3, 32, (1, 3), 1, (), False, None, False)
    with pytest.raises(ValueError, match="cannot infer image_size for channel_mult"):
        import_weights(state, "iddpm")
    with pytest.raises(ValueError, match="not an improved-diffusion state dict"):
        import_weights({"conv_in.weight": torch.zeros(1)}, "iddpm")
