"""The partition pass on its own (no processes): collectives, local extents, errors, and the
partitioned program run device by device in one process against the unpartitioned cascade."""

from __future__ import annotations

import pytest
import torch
from layer_inputs import layer_inputs

from kascade.backends.distributed import run_serial, segments, shard_inputs
from kascade.backends.reference import evaluate
from kascade.ir.errors import RewriteError, ShapeError
from kascade.ir.library.layer import decoder_layer
from kascade.ir.library.mlp import gemm
from kascade.ir.library.moe import moe
from kascade.passes.moe_grouping import group_experts
from kascade.passes.partition import (
    Shard,
    format_partitioned,
    format_pipeline,
    kv_transfer,
    parse_mapping,
    partition,
    pipeline_stages,
)

PARAMS = dict(scale=0.4, eps=1e-5)


def test_tp_dense_layer_is_megatron():
    """g and f over tp: weights sliced per head group / FFN column, two sum all-reduces of T x D."""
    p = partition(decoder_layer(), "g=tp:2,f=tp:2")
    assert [(c.kind, c.op, c.tensor, c.axis, c.group) for c in p.collectives] == [
        ("all_reduce", "sum", "HA_part", "tp", 2), ("all_reduce", "sum", "Y_part", "tp", 2)]
    assert [c.bytes_at({"T": 7, "D": 24}) for c in p.collectives] == [4 * 7 * 24] * 2
    assert dict(p.input_shards).keys() == {"WQ", "WK", "WV", "WO", "WG", "WU", "WD"}
    assert p.local.input("WO").ranks == ("d", "g_tp", "r", "e")
    assert p.local.input("X").ranks == ("t", "d")
    assert p.local_extents({"G": 4, "F": 20}) == {"G_TP": 2, "F_TP": 10}
    assert p.world_size == 2 and p.coords(1) == {"tp": 1}
    text = format_partitioned(p)
    assert "<all_reduce[sum](HA_part) over tp x2, bytes = 4 * T * D>" in text
    assert "HA[t, d] = X[t, d] + HA_part[t, d]" in text


def test_ep_moe_layer_keeps_the_router_whole():
    """x over ep: router replicated (top-k needs all experts), experts sliced, one all-reduce."""
    p = partition(decoder_layer(moe=True), {"x": ("ep", 4)})
    assert [(c.kind, c.tensor, c.axis, c.group) for c in p.collectives] == [("all_reduce", "Y_part", "ep", 4)]
    assert [n for n, _ in p.input_shards] == ["W13", "W2"]
    assert p.local.input("WR").ranks == ("x", "d")
    assert p.device_params(3) == {"ep_rank": 3}
    r_stmt = p.local.producer("R")
    assert r_stmt.ranks == ("t", "x_ep") and "x_ep + ep_rank * X_EP" in str(r_stmt.expr)


def test_dp_on_tokens_gathers_the_output():
    """t over dp: queries split, keys recomputed whole (read at s), output all-gathered."""
    p = partition(decoder_layer(), "t=dp:2")
    assert [(c.kind, c.rank, c.tensor) for c in p.collectives] == [("all_gather", "t", "Y")]
    assert p.collectives[0].bytes_at({"T": 8, "D": 16}) == 2 * 8 * 16
    assert p.local.producer("KP").ranks == ("g", "s", "e") and p.local.producer("QP").ranks[2] == "t_dp"


@pytest.mark.parametrize("mapping, T, G, F, X", [
    ("g=tp:2,f=tp:2", 7, 4, 20, 0), ("g=tp:4,f=tp:4", 5, 4, 12, 0), ("t=dp:3", 9, 2, 10, 0),
    ("x=ep:2", 7, 2, 10, 4), ("x=ep:3", 5, 2, 10, 6), ("g=tp:2,x=ep:2", 6, 2, 10, 4)])
def test_serial_mesh_matches_the_evaluator(gen, mapping, T, G, F, X):
    """Every device of the program, collectives done in-process, equals the unpartitioned layer."""
    c = decoder_layer(moe=bool(X))
    ins = layer_inputs(gen, bool(X), T=T, G=G, F=F, X=X or 4)
    ext = {"K": 2} if X else {}
    ref = evaluate(c, ins, PARAMS, ext)["Y"]
    p = partition(c, mapping)
    outs = run_serial(p, ins, PARAMS, ext)
    assert len(outs) == p.world_size
    for out in outs:
        torch.testing.assert_close(out["Y"], ref, rtol=1e-10, atol=1e-10)


def test_serial_moe_block(gen):
    c = moe(router=True)
    ins = dict(X=torch.randn(11, 10, generator=gen, dtype=torch.float64),
               WR=torch.randn(6, 10, generator=gen, dtype=torch.float64),
               W13=torch.randn(6, 2, 7, 10, generator=gen, dtype=torch.float64),
               W2=torch.randn(6, 10, 7, generator=gen, dtype=torch.float64))
    ref = evaluate(c, ins, {}, {"K": 2})["Y"]
    p = partition(c, "x=ep:3")
    assert len(segments(p)) == 1 and [x.tensor for x in p.collectives] == ["Y"]
    for out in run_serial(p, ins, {}, {"K": 2}):
        torch.testing.assert_close(out["Y"], ref, rtol=1e-10, atol=1e-10)


def test_degree_must_divide_the_extent(gen):
    with pytest.raises(ShapeError, match=r"degree 3 does not divide .* rank .g. \(4\); accepted degrees: \[1, 2, 4\]"):
        partition(decoder_layer(), "g=tp:3", extents={"G": 4})
    p = partition(decoder_layer(), "g=tp:3")          # no extents: caught when the inputs are sliced
    with pytest.raises(ShapeError, match="not divisible by the tp degree 3"):
        shard_inputs(p, layer_inputs(gen, False), 0)


@pytest.mark.parametrize("mapping, match", [
    ("q=tp:2", r"no rank 'q'; its ranks are \["),
    ("g=zz:2", "unknown mesh axis 'zz' for rank 'g'; accepted: tp, ep, dp"),
    ("g=pp:2", "use pipeline_stages"),
    ("g=tp:2,f=tp:4", "axis 'tp' has one degree"),
    ("g=tp:0", "positive int"),
    ("s=dp:2", r"extent of rank 's' is declared \(S = T\)"),
    ("gtp2", "write RANK=AXIS:DEGREE"),
])
def test_bad_mappings(mapping, match):
    with pytest.raises(RewriteError, match=match):
        partition(decoder_layer(), mapping)


def test_ranks_that_cannot_be_sharded():
    """Experts read through the routing indices (gather form) need every expert on every device;
    two ranks of one statement on one axis would leave only diagonal blocks."""
    with pytest.raises(RewriteError, match=r"rank 'x' cannot be sharded.*index TI\[t, k\].*accepted"):
        partition(moe(router=True, form="gather"), "x=ep:2")
    with pytest.raises(RewriteError, match="sharded over the same axis"):
        partition(gemm(), [Shard("m", "tp", 2), Shard("n", "tp", 2)])
    assert len(partition(gemm(), [Shard("m", "dp", 2), Shard("n", "tp", 2)]).collectives) == 2


def test_parse_mapping_forms():
    assert parse_mapping("g=tp:2, f=tp:2") == parse_mapping({"g": ("tp", 2), "f": ("tp", 2)}) \
        == (Shard("g", "tp", 2), Shard("f", "tp", 2))


def test_pipeline_stages_compose_to_the_layer(gen):
    """Two stages: stage 0's live tensors are sent point-to-point; running the stages in turn
    gives the layer's output."""
    c = decoder_layer()
    pp = pipeline_stages(c, [14])   # cut after the attention block's residual (HA)
    assert [(t.kind, t.tensor, t.src, t.dst) for t in pp.transfers] == [("p2p", "HA", 0, 1)]
    assert pp.transfers[0].bytes_at({"T": 7, "D": 24}) == 4 * 7 * 24
    ins = layer_inputs(gen, False)
    env = dict(ins)
    for st in pp.stages:
        env.update(evaluate(st, {t.name: env[t.name] for t in st.inputs}, PARAMS, {}, keep_all=True))
    torch.testing.assert_close(env["Y"], evaluate(c, ins, PARAMS)["Y"], rtol=1e-12, atol=1e-12)
    assert "stage 1" in format_pipeline(pp)
    assert len(pipeline_stages(c, 3).stages) == 3
    with pytest.raises(RewriteError, match="stages for 20 statements"):
        pipeline_stages(c, 0)


def test_kv_transfer_sizes():
    kv = kv_transfer(decoder_layer())
    assert [(k.kind, k.tensor) for k in kv] == [("kv_transfer", "KR"), ("kv_transfer", "VP")]
    assert kv[0].bytes_at({"G": 8, "T": 100, "E": 128}) == 4 * 8 * 100 * 128
    with pytest.raises(RewriteError, match="no tensor 'KC'"):
        kv_transfer(decoder_layer(), ("KC",))


def test_axis_shorthand_and_the_cli(gen):
    """``tp=2,ep=2`` on the MoE layer: heads and the experts' inner rank over tp, experts over ep."""
    c = decoder_layer(moe=True)
    p = partition(c, "tp=2,ep=2")
    assert [(s.rank, s.axis) for s in p.shards] == [("g", "tp"), ("f", "tp"), ("x", "ep")]
    ins = layer_inputs(gen, True, T=5, G=2, F=6, X=4)
    ref = evaluate(c, ins, PARAMS, {"K": 2})["Y"]
    for out in run_serial(p, ins, PARAMS, {"K": 2}):
        torch.testing.assert_close(out["Y"], ref, rtol=1e-10, atol=1e-10)
    from typer.testing import CliRunner

    from kascade.cli import app
    res = CliRunner().invoke(app, ["lower", "decoder_layer", "--partition", "tp=2"])
    assert res.exit_code == 0 and "<all_reduce[sum](Y_part) over tp x2" in res.output
    res = CliRunner().invoke(app, ["lower", "decoder_layer", "--partition", "q=tp:2"])
    assert res.exit_code != 0 and "no rank 'q'" in res.output


def test_ep_all_to_all_on_the_grouped_form(gen):
    """The grouped MoE under x=ep: counts exchanged, then expert ids and token rows dispatched,
    results returned (four all-to-alls), Y gathered over the token shards; run in-process with
    an idle expert and an idle device, equal to the evaluator."""
    c = group_experts(moe())
    p = partition(c, "x=ep:2")
    assert [(x.kind, x.tensor, x.into, x.splits) for x in p.collectives] == [
        ("all_to_all", "CNT", "CNT_RECV", None),
        ("all_to_all", "ROWEXP", "ROWEXP_RECV", ("CNT_SEND", "CNT_ROWS_RECV")),
        ("all_to_all", "XS", "XS_RECV", ("CNT_SEND", "CNT_ROWS_RECV")),
        ("all_to_all", "EO", "EO_BACK", ("CNT_ROWS_RECV", "CNT_SEND")),
        ("all_gather", "Y", None, None)]
    ext = {"T": 12, "K": 2, "D": 10, "X": 6}
    assert p.collectives[2].bytes_at(ext) == 2 * 12 * 2 * 10    # T * K rows of D bf16 in all
    assert p.collectives[0].bytes_at(ext) == 4 * 2 * 6
    assert p.received == ("CNT_RECV", "ROWEXP_RECV", "XS_RECV", "EO_BACK")
    assert [n for n, _ in p.input_shards] == ["W13", "W2"]
    text = format_partitioned(p)
    assert "<all_to_all(XS -> XS_RECV) over ep x2, rows CNT_SEND -> CNT_ROWS_RECV, bytes = 2 * (T * K) * D>" in text
    assert "W13[ROWEXP_RECV[u] - ep_rank * X_EP, h, f, d]" in text
    ins = dict(LG=torch.randn(12, 6, generator=gen, dtype=torch.float64),
               X=torch.randn(12, 10, generator=gen, dtype=torch.float64),
               W13=torch.randn(6, 2, 5, 10, generator=gen, dtype=torch.float64),
               W2=torch.randn(6, 10, 5, generator=gen, dtype=torch.float64))
    ins["LG"][:, 2] = ins["LG"][:, 3:] = -30.0   # expert 2 idle on device 0; device 1's experts all idle
    ref = evaluate(c, ins, {}, {"K": 2}, keep_all=True)
    assert ref["CNT"][2:].sum() == 0 and ref["CNT"][:2].min() > 0
    for out in run_serial(p, ins, {}, {"K": 2}):
        torch.testing.assert_close(out["Y"], ref["Y"], rtol=1e-10, atol=1e-10)


def test_ep_style_choices(gen):
    """all_to_all groups a dense MoE first; all_reduce stays the dense form's default and is
    refused on the grouped form; the experts' inner rank is not sharded with all_to_all."""
    dense = moe(router=True)
    a2a = partition(dense, "x=ep:2", ep_style="all_to_all")
    assert [x.kind for x in a2a.collectives].count("all_to_all") == 4
    assert [x.kind for x in partition(dense, "x=ep:2").collectives] == ["all_reduce"]
    ins = dict(X=torch.randn(8, 10, generator=gen, dtype=torch.float64),
               WR=torch.randn(4, 10, generator=gen, dtype=torch.float64),
               W13=torch.randn(4, 2, 7, 10, generator=gen, dtype=torch.float64),
               W2=torch.randn(4, 10, 7, generator=gen, dtype=torch.float64))
    ref = evaluate(dense, ins, {}, {"K": 2})["Y"]
    for out in run_serial(a2a, ins, {}, {"K": 2}):
        torch.testing.assert_close(out["Y"], ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(RewriteError, match="ep_style='all_reduce' needs the dense MoE form"):
        partition(group_experts(dense), "x=ep:2", ep_style="all_reduce")
    with pytest.raises(RewriteError, match="accepted: 'all_to_all', 'all_reduce'"):
        partition(dense, "x=ep:2", ep_style="alltoall")
    with pytest.raises(RewriteError, match=r"does not shard ranks \['f'\]"):
        partition(group_experts(dense), "x=ep:2,f=tp:2")
    with pytest.raises(RewriteError, match="split over the experts' axis"):
        partition(group_experts(dense), "x=ep:2,t=dp:2")
    with pytest.raises(RewriteError, match="group_experts"):
        partition(gemm(), "m=tp:2", ep_style="all_to_all")


@pytest.mark.parametrize("mapping", ["x=ep:2", "t=ep:2,x=ep:2", "g=tp:2,x=ep:2"])
def test_serial_ep_all_to_all_layer(gen, mapping):
    """The grouped MoE decoder layer: attention replicated, token-sharded (DP attention) or over tp."""
    c = group_experts(decoder_layer(moe=True))
    ins = layer_inputs(gen, True, T=6, G=2, F=6, X=4)
    ref = evaluate(c, ins, PARAMS, {"K": 2})["Y"]
    for out in run_serial(partition(c, mapping), ins, PARAMS, {"K": 2}):
        torch.testing.assert_close(out["Y"], ref, rtol=1e-10, atol=1e-10)
