"""Tests of the paper's 2.5D U-Net (AM + PE) and its nnU-Net integration."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunetv2_gtv.network import (
    NETWORK_CLASS_PATH,
    PAPER_VARIANTS,
    AttentionGate,
    AttentionModule,
    GTV25DUNet,
    ProjectExcite,
    SliceConv3d,
    SliceConvTranspose3d,
    default_arch_kwargs,
    plans_architecture,
)
from nnunetv2_gtv.network.reference import reference_copy


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _build(deep_supervision: bool = False, num_classes: int = 2, **options) -> GTV25DUNet:
    """Build through nnU-Net's own factory, as nnU-Net's trainer does."""
    arch = plans_architecture(default_arch_kwargs(**options))
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  input_channels=1, output_channels=num_classes, deep_supervision=deep_supervision)


def _nnunet_ds_scales(strides) -> list[list[float]]:
    """Deep-supervision scales exactly as nnU-Net's trainer derives them from the plans."""
    fake_trainer = SimpleNamespace(enable_deep_supervision=True,
                                   configuration_manager=SimpleNamespace(pool_op_kernel_sizes=strides))
    return nnUNetTrainer._get_deep_supervision_scales(fake_trainer)


@pytest.mark.parametrize("spatial", [(16, 64, 64), (7, 32, 48), (1, 8, 8), (5, 24, 40)])
def test_output_shape_equals_input_shape_without_deep_supervision(spatial):
    net = _build().eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, *spatial))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 2, *spatial)


@pytest.mark.parametrize("spatial", [(16, 64, 64), (3, 16, 40)])
def test_deep_supervision_outputs_match_nnunet_scales(spatial):
    net = _build(deep_supervision=True, num_classes=3).eval()
    with torch.no_grad():
        outs = net(torch.randn(1, 1, *spatial))
    scales = _nnunet_ds_scales(default_arch_kwargs()["strides"])
    assert isinstance(outs, list) and len(outs) == len(scales) == 4
    for out, scale in zip(outs, scales):
        assert out.shape == (1, 3, *(round(s * f) for s, f in zip(spatial, scale)))


def test_nnunet_switches_deep_supervision_through_decoder_attribute():
    net = _build(deep_supervision=True).eval()
    x = torch.randn(1, 1, 2, 16, 16)
    with torch.no_grad():
        with_ds = net(x)
        nnUNetTrainer.set_deep_supervision_enabled(SimpleNamespace(is_ddp=False, network=net), False)
        without_ds = net(x)
    assert isinstance(with_ds, list) and isinstance(without_ds, torch.Tensor)
    assert torch.equal(with_ds[0], without_ds)


@pytest.mark.parametrize("spatial", [(16, 60, 64), (16, 64, 36), (4, 12, 12)])
def test_rejects_in_plane_sizes_not_divisible_by_eight(spatial):
    net = _build().eval()
    with pytest.raises(ValueError, match=r"divisible by \(1, 8, 8\)"):
        net(torch.randn(1, 1, *spatial))


def test_rejects_non_5d_input():
    with pytest.raises(ValueError, match="5D tensor"):
        _build().eval()(torch.randn(1, 16, 64, 64))


def _expected_parameter_count(features=(16, 32, 64, 128, 256), in_ch=1, n_cls=2) -> int:
    """Count derived by hand from the layer shapes of Fig. 3-5 and the authors' code (weights + biases)."""
    conv = lambda cin, cout, k: cin * cout * k + cout  # noqa: E731  (conv with bias, k = kernel volume)
    bn = lambda c: 2 * c  # noqa: E731
    block = lambda cin, cout, k: conv(cin, cout, k) + bn(cout) + conv(cout, cout, k) + bn(cout)  # noqa: E731
    pe = lambda c: conv(c, c // 2, 1) + conv(c // 2, c, 1)  # noqa: E731
    am = lambda c: conv(c, c // 2, 9) + conv(c // 2, 1, 9)  # noqa: E731
    f0, f1, f2, f3, f4 = features
    encoder = block(in_ch, f0, 9) + block(f0, f1, 9) + block(f1, f2, 9) + block(f2, f3, 9)
    bottom = am(f3) + pe(f3) + block(f3, f4, 27)
    ups = conv(f4, f3, 1) + bn(f3) + conv(f3, f2, 4) + bn(f2) + conv(f2, f1, 4) + bn(f1) + conv(f1, f0, 4) + bn(f0)
    decoder = sum(am(2 * c) + pe(2 * c) + block(2 * c, c, 9) for c in (f3, f2, f1, f0))
    encoder_pe = pe(f0) + pe(f1) + pe(f2)
    output_conv = conv(f0, n_cls, 9)
    deep_supervision_heads = conv(f3, n_cls, 1) + conv(f2, n_cls, 1) + conv(f1, n_cls, 1)
    return encoder + encoder_pe + bottom + ups + decoder + output_conv + deep_supervision_heads


def test_default_parameter_count_matches_hand_count():
    net = _build()
    total = sum(p.numel() for p in net.parameters())
    heads = sum(p.numel() for name, p in net.named_parameters()
                if name.startswith("decoder.seg_layers.") and not name.startswith("decoder.seg_layers.3."))
    print(f"\nGTV25DUNet default: {total:,} parameters ({total - heads:,} without the deep-supervision heads)")
    assert total == _expected_parameter_count()
    assert 4.1e6 < total - heads < 4.3e6


def test_paper_structure_module_counts_and_kernels():
    net = _build()
    assert sum(isinstance(m, ProjectExcite) for m in net.modules()) == 8
    assert sum(isinstance(m, AttentionModule) for m in net.modules()) == 5
    assert sum(isinstance(m, nn.BatchNorm3d) for m in net.modules()) == 9 * 2 + 4
    pools = [m for m in net.modules() if isinstance(m, nn.MaxPool3d)]
    assert [m.kernel_size for m in pools] == [(1, 2, 2)] * 3
    ups = [m for m in net.modules() if isinstance(m, nn.ConvTranspose3d)]
    assert [m.kernel_size for m in ups] == [(1, 1, 1), (1, 2, 2), (1, 2, 2), (1, 2, 2)]
    block_kernels = [m.kernel_size for name, m in net.named_modules() if name.endswith(".conv")]
    assert block_kernels.count((3, 3, 3)) == 2 and block_kernels.count((1, 3, 3)) == 16
    assert net.decoder.seg_layers[-1].kernel_size == (1, 3, 3)


def test_attention_module_returns_x_times_map_plus_x():
    am = AttentionModule(channels=6)
    maps = []
    am.attention_map.register_forward_hook(lambda module, inputs, output: maps.append(output))
    x = torch.randn(2, 6, 3, 10, 12) * 3
    out = am(x)
    (a,) = maps
    assert a.shape == (2, 1, 3, 10, 12)
    assert a.min() >= 0 and a.max() <= 1 and a.std() > 0
    torch.testing.assert_close(out, x * a + x)
    # the map itself, recomputed from the two 1x3x3 convolutions (C -> C/2 -> 1) with plain torch ops
    conv1, _, conv2, _ = am.attention_map
    assert conv1.weight.shape == (3, 6, 1, 3, 3) and conv2.weight.shape == (1, 3, 1, 3, 3)
    reference = torch.sigmoid(F.conv3d(torch.relu(F.conv3d(x, conv1.weight, conv1.bias, padding=(0, 1, 1))),
                                       conv2.weight, conv2.bias, padding=(0, 1, 1)))
    torch.testing.assert_close(a, reference)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in am.modules())


def test_project_excite_matches_reference_projections():
    pe = ProjectExcite(channels=4, reduction=2).double()
    x = torch.randn(2, 4, 3, 5, 6, dtype=torch.float64)
    xn = x.numpy()
    batch, channels, depth, height, width = xn.shape
    z = np.zeros_like(xn)
    for b in range(batch):
        for c in range(channels):
            for k in range(depth):
                for i in range(height):
                    for j in range(width):
                        z_h = xn[b, c, :, i, :].sum() / (width * depth)  # eq. 1
                        z_w = xn[b, c, :, :, j].sum() / (height * depth)  # eq. 2
                        z_d = xn[b, c, k, :, :].sum() / (height * width)  # eq. 3
                        z[b, c, k, i, j] = z_h + z_w + z_d
    conv1, _, conv2, _ = pe.excite
    w1 = conv1.weight.detach().numpy().reshape(2, 4)
    w2 = conv2.weight.detach().numpy().reshape(4, 2)
    hidden = np.maximum(np.einsum("oc,bcdhw->bodhw", w1, z) + conv1.bias.detach().numpy()[None, :, None, None, None], 0)
    gate = 1 / (1 + np.exp(-(np.einsum("oc,bcdhw->bodhw", w2, hidden)
                              + conv2.bias.detach().numpy()[None, :, None, None, None])))  # eq. 4
    np.testing.assert_allclose(pe(x).detach().numpy(), xn * gate, rtol=1e-10, atol=1e-12)  # eq. 5


def test_attention_gate_matches_additive_attention_formula():
    gate = AttentionGate(skip_channels=4, gate_channels=6, inter_channels=3)
    x, g = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 6, 2, 8, 8)
    w_x = gate.w_x.weight.reshape(3, 4)
    w_g = gate.w_g.weight.reshape(3, 6)
    psi = gate.coefficients[1]
    q = torch.einsum("oc,bcdhw->bodhw", w_x, x) + torch.einsum("oc,bcdhw->bodhw", w_g, g)
    q = torch.relu(q + gate.w_g.bias.view(1, 3, 1, 1, 1))
    alpha = torch.sigmoid(torch.einsum("oc,bcdhw->bodhw", psi.weight.reshape(1, 3), q) + psi.bias)
    torch.testing.assert_close(gate(x, g), x * alpha)


def test_gradients_reach_every_parameter():
    net = _build(deep_supervision=True).train()
    x = torch.randn(2, 1, 4, 32, 32)
    outs = net(x)
    loss = sum(F.cross_entropy(o, torch.randint(0, 2, (o.shape[0], *o.shape[2:]))) for o in outs)
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient for {missing}"


VARIANT_OPTIONS = [*PAPER_VARIANTS.values(), {"num_pool": 2}, {"num_pool": 4},
                   {"features_per_stage": [8, 16, 32, 64, 128]}, {"features_per_stage": [8, 16, 24]}]


@pytest.mark.parametrize("options", VARIANT_OPTIONS, ids=[*PAPER_VARIANTS, "pool2", "pool4", "narrow", "3stages"])
def test_every_variant_builds_and_runs(options):
    net = _build(**options).train()
    kwargs = default_arch_kwargs(**options)
    n_stages = len(kwargs["features_per_stage"])
    divisor = 2 ** (n_stages - 2)
    spatial = (3, 2 * divisor, 3 * divisor)
    out = net(torch.randn(2, 1, *spatial))
    assert out.shape == (2, 2, *spatial)
    attention = options.get("attention", "am")
    pe = options.get("project_excite", True)
    count = lambda cls: sum(isinstance(m, cls) for m in net.modules())  # noqa: E731
    assert count(AttentionModule) == (n_stages if attention == "am" else 0)
    assert count(AttentionGate) == (n_stages - 1 if attention == "ag" else 0)
    assert count(ProjectExcite) == (2 * n_stages - 2 if pe else 0)
    assert count(nn.MaxPool3d) == n_stages - 2
    block_kernels = {m.kernel_size for name, m in net.named_modules() if name.endswith(".conv")}
    assert block_kernels == ({(3, 3, 3)} if options.get("kernel_pattern") == "3d" else {(1, 3, 3), (3, 3, 3)})


def test_builds_from_json_plans_through_nnunet_trainer():
    plans = {"configurations": {"3d_fullres": {"patch_size": [16, 64, 64], "batch_size": 2,
                                               "architecture": plans_architecture()}}}
    plans = json.loads(json.dumps(plans))  # as written to and read from plans.json
    configuration = PlansManager(plans).get_configuration("3d_fullres")
    assert configuration.network_arch_class_name == NETWORK_CLASS_PATH
    net = nnUNetTrainer.build_network_architecture(PlansManager(plans), configuration, 1, 2,
                                                   enable_deep_supervision=True)
    assert isinstance(net, GTV25DUNet) and net.decoder.deep_supervision
    assert len(_nnunet_ds_scales(configuration.pool_op_kernel_sizes)) == len(net.decoder.seg_layers)
    # He initialisation applied by get_network_from_plans via network.initialize
    bottom_conv = net.encoder.stages[-1].convs.convs[1].conv
    fan_in = bottom_conv.weight[0].numel()
    he_std = math.sqrt(2 / (1 + 0.01**2) / fan_in)
    assert abs(bottom_conv.weight.std().item() / he_std - 1) < 0.05
    assert all(torch.all(m.bias == 0) for m in net.modules() if isinstance(m, nn.Conv3d) and m.bias is not None)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated:FutureWarning")
def test_traced_network_equals_eager():
    net = _build().eval()
    example = torch.randn(1, 1, 4, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(net, example, check_trace=False)  # compared below on two input sizes
        for shape in [(1, 1, 4, 32, 32), (2, 1, 7, 16, 48)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(traced(x), net(x))


def test_exported_program_equals_eager_for_other_sizes(tmp_path):
    """torch.export (the successor of the deprecated jit.trace) with dynamic batch, slices and in-plane size."""
    net = _build().eval()
    dims = {0: torch.export.Dim("batch", max=64), 2: torch.export.Dim("slices", max=512),
            3: 8 * torch.export.Dim("rows8", max=64), 4: 8 * torch.export.Dim("cols8", max=64)}
    program = torch.export.export(net, (torch.randn(2, 1, 4, 32, 32),), dynamic_shapes={"x": dims})
    torch.export.save(program, tmp_path / "gtv25d.pt2")
    loaded = torch.export.load(tmp_path / "gtv25d.pt2").module()
    with torch.no_grad():
        for shape in [(1, 1, 1, 16, 16), (3, 1, 7, 16, 48)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(loaded(x), net(x))


@pytest.mark.parametrize("options, message", [
    ({"attention": "cbam"}, "attention must be one of"),
    ({"kernel_pattern": "2d"}, "kernel_pattern must be one of"),
    ({"features_per_stage": [16, 32, 64], "num_pool": 3}, "needs 5"),
])
def test_invalid_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        GTV25DUNet(1, 2, **default_arch_kwargs(**options))


def test_invalid_strides_raise():
    kwargs = default_arch_kwargs()
    kwargs["strides"][0] = [1, 2, 2]
    with pytest.raises(ValueError, match=r"strides\[0\]"):
        GTV25DUNet(1, 2, **kwargs)
    with pytest.raises(ValueError, match="does not name an importable class"):
        GTV25DUNet(1, 2, **{**default_arch_kwargs(), "norm_op": "torch.nn.NoSuchNorm"})


def test_default_arch_kwargs_are_json_serialisable_and_match_constructor_defaults():
    kwargs = default_arch_kwargs()
    assert json.loads(json.dumps(kwargs)) == kwargs
    assert kwargs["strides"] == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [1, 2, 2], [1, 1, 1]]
    from_plans = GTV25DUNet(1, 2, **kwargs)
    plain = GTV25DUNet(1, 2)
    assert [tuple(p.shape) for p in from_plans.parameters()] == [tuple(p.shape) for p in plain.parameters()]
    assert str(from_plans) == str(plain)


@pytest.mark.parametrize("options", [{}, {"attention": "ag"}, {"attention": "none", "project_excite": False},
                                     {"kernel_pattern": "3d", "attention": "none", "project_excite": False}])
def test_fast_cpu_path_computes_the_reference_network(options):
    """Slice-folded convolutions and the factored PE equal the direct formulation: in float64 to round-off
    (outputs and every gradient, training mode), in float32 within float32 round-off (outputs); state dicts are
    shared."""
    torch.manual_seed(0)
    network = GTV25DUNet(1, 2, **default_arch_kwargs(**options))
    network.apply(GTV25DUNet.initialize)
    assert any(isinstance(m, SliceConv3d) for m in network.modules())
    x = torch.randn(2, 1, 8, 32, 32, dtype=torch.float64)
    fast = network.double().train()
    reference = reference_copy(fast)
    assert not any(isinstance(m, (SliceConv3d, SliceConvTranspose3d)) for m in reference.modules())
    out_fast, out_reference = fast(x), reference(x)
    assert out_fast.is_contiguous()
    assert (out_fast - out_reference).abs().max() <= 1e-10 * out_reference.abs().max()
    out_fast.square().mean().backward()
    out_reference.square().mean().backward()
    grads = [(p.grad, q.grad) for p, q in zip(fast.parameters(), reference.parameters()) if q.grad is not None]
    scale = max(q.abs().max() for _, q in grads)
    assert max((p - q).abs().max() for p, q in grads) <= 1e-10 * scale
    fast, reference = fast.float(), reference.float()
    for mode in ("train", "eval"):
        out_fast, out_reference = getattr(fast, mode)()(x.float()), getattr(reference, mode)()(x.float())
        assert (out_fast - out_reference).abs().max() <= 1e-4 * out_reference.abs().max()
    # a checkpoint of the direct formulation loads into the fast one unchanged
    assert reference.state_dict().keys() == network.state_dict().keys()
    network.load_state_dict(reference.state_dict())


def test_slice_conv_folds_only_convolutions_that_keep_slices_apart():
    assert SliceConv3d(4, 4, (1, 3, 3), padding=(0, 1, 1))._folds()
    assert SliceConv3d(4, 4, 1)._folds()
    assert SliceConv3d(4, 4, (1, 3, 3), padding="same")._folds()
    assert not SliceConv3d(4, 4, (3, 3, 3), padding=1)._folds()
    assert not SliceConv3d(4, 4, (1, 3, 3), padding=(1, 1, 1))._folds()
    assert not SliceConv3d(4, 4, (1, 3, 3), stride=(2, 1, 1))._folds()
    assert SliceConvTranspose3d(4, 4, (1, 2, 2), stride=(1, 2, 2))._folds()
    assert not SliceConvTranspose3d(4, 4, (2, 2, 2), stride=(2, 2, 2))._folds()
    torch.manual_seed(0)
    for fast in (SliceConv3d(3, 5, (1, 3, 3), padding=(0, 1, 1), stride=(1, 2, 2)),
                 SliceConvTranspose3d(3, 5, (1, 2, 2), stride=(1, 2, 2))):
        x = torch.randn(2, 3, 4, 8, 8, dtype=torch.float64)
        fast = fast.double()
        plain = nn.Conv3d if isinstance(fast, SliceConv3d) else nn.ConvTranspose3d
        assert torch.allclose(fast(x), plain.forward(fast, x), atol=1e-12)
