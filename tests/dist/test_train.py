"""Training parity on CPU gloo: parallel runs give the losses and parameters of one process.

Each case runs a few optimizer steps of the tiny model through the real Trainer on the
4-rank worker pool and compares with :func:`reference_run` (no parallelism at all) in the
parent. Tolerances: fp32 rounding differs (ring merges, reduce-scatter sums in another
order), measured ~1e-6 relative on losses; after AdamW steps a parameter can differ by a
few ulps of its update size, hence the absolute bound on parameters.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist.cases_train import fit_case, memory_case, reference_run, tiny_config
from tests.dist.pool import RankError

LOSS_RTOL = 2e-5
PARAM_ATOL = 1e-5


def _assert_same(run: dict, ref: dict, start: int = 0) -> None:
    want = ref["losses"][start:]
    torch.testing.assert_close(
        torch.tensor(run["losses"]), torch.tensor(want), rtol=LOSS_RTOL, atol=0
    )
    assert set(run["params"]) == set(ref["params"])
    for name, p in ref["params"].items():
        torch.testing.assert_close(run["params"][name], p, rtol=0, atol=PARAM_ATOL, msg=name)


def _fit(pools, cfg: dict) -> dict:
    return pools(4).run(fit_case, cfg, timeout=240)[0]


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_cp4_ring_matches_one_process(pools, tmp_path, layout):
    cfg = tiny_config(str(tmp_path), parallel={"cp": 4, "layout": layout})
    run = _fit(pools, cfg)
    _assert_same(run, reference_run(cfg))
    assert run["eval"]["eval_targets"] == 4 * 3  # 4 held-out sequences x 3 queries


def test_tp2_dp2_plain_ffn_sequence_parallel(pools, tmp_path):
    cfg = tiny_config(str(tmp_path), parallel={"tp": 2, "dp": 2})
    _assert_same(_fit(pools, cfg), reference_run(cfg))


@pytest.mark.parametrize(
    "parallel",
    [
        {"cp": 4, "strategy": "allgather"},
        {"cp": 4, "strategy": "ulysses", "layout": "contiguous"},
        {"cp": 4, "strategy": "hybrid", "ulysses": 2},
        {"cp": 2, "dp": 2, "strategy": "hybrid", "ulysses": 2, "layout": "striped"},
    ],
    ids=["allgather", "ulysses", "hybrid_2x2", "dp2_hybrid_1x2"],
)
def test_other_cp_strategies_match_one_process(pools, tmp_path, parallel):
    cfg = tiny_config(str(tmp_path), parallel=parallel)
    _assert_same(_fit(pools, cfg), reference_run(cfg))


def test_dp2_cp2_fsdp_matches_one_process(pools, tmp_path):
    cfg = tiny_config(str(tmp_path), parallel={"dp": 2, "cp": 2, "ac": "full"})
    _assert_same(_fit(pools, cfg), reference_run(cfg))


@pytest.mark.parametrize("sp", [True, False], ids=["sp", "no_sp"])
def test_tp2_cp2_blockwise_ffn_matches_plain_one_process(pools, tmp_path, sp):
    # ffn_chunk 8 < 32 local tokens: the tensor-parallel blockwise FFN path, forward and
    # backward, against the plain (unchunked) FFN of the reference
    cfg = tiny_config(
        str(tmp_path),
        parallel={"tp": 2, "cp": 2, "sequence_parallel": sp},
        model={"preset": "tiny", "ffn_chunk": 8},
    )
    ref_cfg = tiny_config(str(tmp_path))
    _assert_same(_fit(pools, cfg), reference_run(ref_cfg))


def test_curriculum_and_dp4(pools, tmp_path):
    cfg = tiny_config(
        str(tmp_path),
        parallel={"dp": 4},
        data={"curriculum": [[32, 8, 2]], "seq_len": 64, "batch_size": 4},
        eval={"batch_size": 4},
    )
    run = _fit(pools, cfg)
    _assert_same(run, reference_run(cfg))
    assert (tmp_path / "metrics.jsonl").is_file()


def test_resume_reproduces_uninterrupted_run_with_other_degrees(pools, tmp_path):
    steps = dict(steps=4)
    full = tiny_config(str(tmp_path / "full"), parallel={"dp": 2, "cp": 2}, train=steps)
    ref = reference_run(full)
    uninterrupted = _fit(pools, full)
    _assert_same(uninterrupted, ref)
    # first half at dp=1 x cp=4, checkpoint at step 2 ...
    ckpt = {"enabled": True, "every": 2, "dir": str(tmp_path / "ckpt")}
    first = tiny_config(
        str(tmp_path / "a"), parallel={"cp": 4}, train={"steps": 2}, checkpoint=ckpt
    )
    _fit(pools, first)
    assert (tmp_path / "ckpt" / "step_2" / ".metadata").is_file()
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_2"
    # ... a save that crashed half-way must be ignored ...
    (tmp_path / "ckpt" / "step_3.tmp").mkdir()
    (tmp_path / "ckpt" / "step_3.tmp" / "__0_0.distcp").write_bytes(b"partial")
    # ... then resume at dp=2 x cp=2 (resharded by DCP) for the last two steps
    second = tiny_config(
        str(tmp_path / "b"), parallel={"dp": 2, "cp": 2}, train=steps, checkpoint=ckpt
    )
    resumed = _fit(pools, second)
    assert resumed["start_step"] == 2
    torch.testing.assert_close(
        torch.tensor(resumed["losses"]),
        torch.tensor(uninterrupted["losses"][2:]),
        rtol=LOSS_RTOL,
        atol=0,
    )
    _assert_same(resumed, ref, start=2)


def test_bf16_tracks_fp32(pools, tmp_path):
    cfg = tiny_config(str(tmp_path), parallel={"cp": 4}, train={"dtype": "bf16"})
    run = _fit(pools, cfg)
    ref = reference_run(tiny_config(str(tmp_path)))
    torch.testing.assert_close(
        torch.tensor(run["losses"]), torch.tensor(ref["losses"]), rtol=2e-2, atol=0
    )


def _text_cfg(tmp_path, **parallel) -> dict:
    docs = tmp_path / "docs"
    docs.mkdir(exist_ok=True)
    for i in range(6):
        (docs / f"{i}.txt").write_text(f"document {i}: " + "lorem ipsum dolor " * (3 + 5 * i))
    return tiny_config(
        str(tmp_path),
        parallel=parallel,
        data={
            "kind": "text",
            "paths": [str(docs)],
            "seq_len": 64,
            "batch_size": 4,
            "val_fraction": 0.2,
        },
        eval={"n_seqs": 4, "batch_size": 4, "seq_len": 64},
    )


def test_packed_text_documents_dp4_match_one_process(pools, tmp_path):
    cfg = _text_cfg(tmp_path, dp=4)
    _assert_same(_fit(pools, cfg), reference_run(cfg))


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
def test_packed_text_documents_with_cp(pools, tmp_path, strategy):
    # cu_seqlens travel per batch row into ringattn.context_parallel_attention
    cfg = _text_cfg(tmp_path, dp=2, cp=2, strategy=strategy)
    _assert_same(_fit(pools, cfg), reference_run(cfg))


def test_wrong_world_size_is_a_clear_error(pools, tmp_path):
    cfg = tiny_config(str(tmp_path), parallel={"cp": 3})
    with pytest.raises(RankError, match=r"dp \* cp \* tp = 1 \* 3 \* 1 = 3 but the job has 4"):
        _fit(pools, cfg)


def test_activation_memory_per_rank_falls_as_one_over_cp(pools, tmp_path):
    # the same 4 ranks: dp = 4 (each rank holds a whole sequence of 2048 tokens) against
    # cp = 4 (each holds a quarter of one): per-rank activations must shrink ~4x
    data = {"seq_len": 2048, "batch_size": 4}
    dp4 = pools(4).run(memory_case, tiny_config(str(tmp_path), parallel={"dp": 4}, data=data))
    data["batch_size"] = 1
    cp4 = pools(4).run(memory_case, tiny_config(str(tmp_path), parallel={"cp": 4}, data=data))
    ratio = max(cp4) / max(dp4)
    assert 0.22 < ratio < 0.3, (dp4, cp4)
