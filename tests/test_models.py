"""Tests for koa_ray.models: attention blocks, KneeDenseNet, build_model and weight loading."""

from __future__ import annotations

import socket
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from koa_ray.models import (
    ARCHS,
    ATTENTIONS,
    CBAM,
    SEBlock,
    SECBAM,
    KneeDenseNet,
    build_model,
    create_attention,
    model_config,
)
from koa_ray.models.blocks import ChannelAttention, SpatialAttention
from koa_ray.models.densenet import adapt_input_conv, remap_legacy_keys

TINY = "densenet_tiny"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty $TORCH_HOME and no network at all: any download attempt raises URLError."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    def no_socket(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_socket)
    monkeypatch.setattr(socket, "create_connection", no_socket)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


# --------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("name", ATTENTIONS)
def test_attention_preserves_shape(name):
    block = create_attention(name, channels=32, reduction=4)
    x = torch.randn(2, 32, 9, 7)
    assert block(x).shape == x.shape


def test_create_attention_types():
    assert isinstance(create_attention("none", 8), nn.Identity)
    assert isinstance(create_attention("se", 8), SEBlock)
    assert isinstance(create_attention("CBAM", 8), CBAM)
    assert isinstance(create_attention("se+cbam", 8), SECBAM)


def test_create_attention_unknown_lists_choices():
    with pytest.raises(ValueError, match="eca") as info:
        create_attention("eca", 8)
    for name in ATTENTIONS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "factory",
    [lambda: SEBlock(0), lambda: SEBlock(8, reduction=0), lambda: ChannelAttention(-1), lambda: SpatialAttention(4)],
)
def test_block_validation(factory):
    with pytest.raises(ValueError):
        factory()


def test_attention_gates_are_bounded():
    # Sigmoid gates in (0, 1): |out| <= |in| element-wise for every block.
    x = torch.randn(2, 16, 5, 5)
    for block in (SEBlock(16, 4), ChannelAttention(16, 4), SpatialAttention(3), CBAM(16, 4)):
        assert torch.all(block(x).abs() <= x.abs() + 1e-6)


# --------------------------------------------------------------------------- KneeDenseNet


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("in_chans", [1, 3])
def test_tiny_shapes(attention, in_chans):
    model = build_model(TINY, attention=attention, in_chans=in_chans, num_classes=5).eval()
    x = torch.randn(2, in_chans, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        pooled = model.forward_head(feats, pre_logits=True)
    assert feats.shape == (2, model.num_features, 2, 2)
    assert model.num_features == model.feature_channels[-1]
    assert logits.shape == (2, 5)
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(model(x), logits)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_densenet121_forward(attention):
    model = build_model("densenet121", attention=attention).eval()
    assert model.feature_channels == (256, 512, 1024, 1024)
    with torch.no_grad():
        out = model(torch.randn(1, 1, 64, 64))
    assert out.shape == (1, 5)


def test_attention_after_each_dense_block():
    model = build_model(TINY, attention="cbam")
    names = [name for name, _ in model.features.named_children()]
    for i in range(1, 5):
        assert names[names.index(f"denseblock{i}") + 1] == f"attention{i}"
        assert isinstance(getattr(model.features, f"attention{i}"), CBAM)
    assert names[-2:] == ["norm5", "relu5"]


@pytest.mark.parametrize("attention", ["none", "se+cbam"])
def test_gradcam_target_layer(attention):
    model = build_model(TINY, attention=attention).eval()
    layer = model.gradcam_target_layer
    assert layer is model.features.attention4
    captured = {}
    handle = layer.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    x = torch.randn(1, 1, 64, 64)
    model(x).sum().backward()
    handle.remove()
    assert captured["out"].ndim == 4
    assert captured["out"].shape[1] == model.num_features


def test_training_step_tiny_gradients_finite():
    model = build_model(TINY, attention="se+cbam")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, 1, 64, 64), torch.tensor([0, 1, 2, 4])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()


def test_channels_last_and_bf16_autocast():
    model = build_model(TINY, attention="se+cbam").to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 64, 64).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 5)
    out.float().sum().backward()


def test_memory_efficient_matches():
    ref = build_model(TINY, attention="cbam").eval()
    eff = build_model(**{**ref.build_config, "memory_efficient": True}).eval()
    eff.load_state_dict(ref.state_dict())
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(eff(x), ref(x))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"arch": "resnet50"}, "densenet_tiny"),
        ({"attention": "eca"}, "se\\+cbam"),
        ({"in_chans": 2}, "in_chans"),
        ({"drop_rate": 1.5}, "drop_rate"),
        ({"pretrained": "imagenet21k"}, "imagenet21k"),
        ({"pretrained": "imagenet", "weights": "x.pt"}, "not both"),
        ({"pretrained": "imagenet"}, "No ImageNet weights"),  # tiny has none
    ],
)
def test_build_model_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(**{"arch": TINY, **kwargs})


def test_archs_registry():
    assert {"densenet121", "densenet_tiny"} <= set(ARCHS)


def test_the_package_names_and_the_model_registries_are_the_same():
    """``koa_ray.ARCHS`` / ``ATTENTIONS`` (what config validation accepts) are exactly what the builder builds."""
    import koa_ray
    from koa_ray.models.densenet import _ARCH_SPECS

    assert tuple(_ARCH_SPECS) == koa_ray.ARCHS == ARCHS
    assert ATTENTIONS == koa_ray.ATTENTIONS
    for name in ARCHS:  # each name builds; a name outside the lists is refused by config and builder alike
        assert sum(p.numel() for p in build_model(name, attention="none").parameters()) > 0
    with pytest.raises(ValueError, match="choose one of"):
        build_model("densenet201")
    with pytest.raises(ValueError, match="choose one of"):
        create_attention("eca", 16)


# --------------------------------------------------------------------------- build_config / weights


def test_build_config_round_trip():
    model = build_model(TINY, attention="se", reduction=8, in_chans=3, num_classes=4, drop_rate=0.1).eval()
    cfg = model_config(model)
    assert cfg == {
        "arch": TINY,
        "attention": "se",
        "reduction": 8,
        "in_chans": 3,
        "num_classes": 4,
        "drop_rate": 0.1,
        "memory_efficient": False,
    }
    clone = build_model(**cfg).eval()
    clone.load_state_dict(model.state_dict())  # strict
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x))


def test_model_config_unwraps_and_errors():
    model = build_model(TINY)
    wrapper = nn.Module()
    wrapper.module = model
    assert model_config(wrapper) == model.build_config
    with pytest.raises(ValueError, match="build_config"):
        model_config(KneeDenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8))


@pytest.mark.parametrize("layout", ["plain", "model", "state_dict", "ddp"])
def test_weights_file_round_trip(tmp_path, layout):
    model = build_model(TINY, attention="cbam").eval()
    sd = model.state_dict()
    payload = {
        "plain": sd,
        "model": {"model": sd, "epoch": 3, "config": model.build_config},
        "state_dict": {"state_dict": sd},
        "ddp": {f"module.{k}": v for k, v in sd.items()},
    }[layout]
    path = tmp_path / "w.pt"
    torch.save(payload, path)
    loaded = build_model(**model.build_config, weights=str(path)).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_weights_file_missing():
    with pytest.raises(FileNotFoundError, match="no_such_weights.pt"):
        build_model(TINY, weights="/nonexistent/no_such_weights.pt")


def test_weights_file_mismatch_reports_keys(tmp_path):
    path = tmp_path / "cbam.pt"
    torch.save(build_model(TINY, attention="cbam").state_dict(), path)
    with pytest.raises(RuntimeError, match="unexpected keys") as info:
        build_model(TINY, attention="none", weights=path)
    assert "features.attention1.channel.fc1.weight" in str(info.value)
    with pytest.raises(RuntimeError, match="shape mismatches"):
        build_model(TINY, attention="cbam", num_classes=3, weights=path)


def test_torchvision_backbone_weights_legacy_keys(tmp_path):
    """A torchvision DenseNet state dict (old 'norm.1' keys, no num_batches_tracked) loads
    into the backbone; conv0 is the RGB mean for 1 channel; attention/fc stay as built."""
    tv = torchvision.models.DenseNet(growth_rate=12, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2)
    legacy = {}
    for key, value in tv.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        for part in ("norm1", "norm2", "conv1", "conv2"):
            key = key.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        legacy[key] = value
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    assert remap_legacy_keys(legacy).keys() == {k for k in tv.state_dict() if "num_batches" not in k}
    path = tmp_path / "tv.pth"
    torch.save(legacy, path)

    torch.manual_seed(1)
    fresh = build_model(TINY, attention="se", in_chans=1)
    torch.manual_seed(1)
    model = build_model(TINY, attention="se", in_chans=1, weights=path)
    torch.testing.assert_close(model.features.conv0.weight, tv.features.conv0.weight.mean(1, keepdim=True))
    torch.testing.assert_close(
        model.features.denseblock2.denselayer1.conv2.weight, tv.features.denseblock2.denselayer1.conv2.weight
    )
    torch.testing.assert_close(model.features.attention1.fc1.weight, fresh.features.attention1.fc1.weight)
    torch.testing.assert_close(model.fc.weight, fresh.fc.weight)

    # in_chans=3 and attention "none": the features equal torchvision's relu(features(x)).
    rgb = build_model(TINY, attention="none", in_chans=3, weights=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rgb.forward_features(x), torch.relu(tv.eval().features(x)))


def test_adapt_input_conv():
    w = torch.randn(4, 3, 7, 7)
    torch.testing.assert_close(adapt_input_conv(w, 1), w.mean(1, keepdim=True))
    assert adapt_input_conv(w, 3) is w
    w1 = torch.randn(4, 1, 7, 7)
    torch.testing.assert_close(adapt_input_conv(w1, 3).sum(1, keepdim=True), w1)
    with pytest.raises(ValueError):
        adapt_input_conv(torch.randn(4, 2, 7, 7), 3)


# --------------------------------------------------------------------------- pretrained="imagenet"


def test_pretrained_offline_raises_clear_error(offline):
    with pytest.raises(RuntimeError, match="offline") as info:
        build_model("densenet121", pretrained="imagenet")
    message = str(info.value)
    assert "densenet121-a639ec97.pth" in message
    assert str(offline) in message
    assert "weights=" in message
    assert isinstance(info.value.__cause__, OSError)


def test_pretrained_uses_file_placed_in_torch_home(offline):
    """The offline recipe from the error message works: a file copied into
    $TORCH_HOME/hub/checkpoints is used without any download."""
    tv = torchvision.models.densenet121()
    offline.mkdir(parents=True)
    torch.save(tv.state_dict(), offline / "densenet121-a639ec97.pth")
    model = build_model("densenet121", attention="cbam", in_chans=1, pretrained="imagenet")
    torch.testing.assert_close(model.features.conv0.weight, tv.features.conv0.weight.mean(1, keepdim=True))
    torch.testing.assert_close(model.features.norm5.running_var, tv.features.norm5.running_var)
    assert "pretrained" not in model.build_config and "weights" not in model.build_config


def test_unwrap_finds_the_bare_model_inside_compile_and_data_parallel():
    """Checkpoints and the weight EMA read the bare model: a ``torch.compile`` wrapper (``--compile``) must not put
    ``_orig_mod.`` into saved keys, with or without DataParallel/DDP around or inside it."""
    from koa_ray.checkpoint import unwrap

    model = build_model(TINY)
    compiled = torch.compile(model)  # wrapping is lazy: nothing is compiled until it is called
    assert unwrap(compiled) is model
    assert unwrap(nn.DataParallel(compiled)) is model
    assert unwrap(torch.compile(nn.DataParallel(model))) is model
    assert list(unwrap(compiled).state_dict()) == list(model.state_dict())
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())  # what a naive save would write
