"""The whole path on real (tiny) data: prepare -> train at cp = 2 -> resume at cp = 4 with the
same batches -> export -> transformers gives our logits.

Training runs on the 4-rank gloo pool (dp = 2 x cp = 2, then dp = 1 x cp = 4) and is
compared with the one-process reference run of :mod:`tests.dist.cases_train`, which reads
the same dataset through ``build_dataset``: equal losses mean equal batches (documents,
``cu_seqlens``, positions restarting per document) at both degrees and across the resume.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numpy")
pytest.importorskip("tokenizers")

from ringattn.data import PrepareConfig, TokenFile, prepare_dataset  # noqa: E402
from tests.dist.cases_train import reference_run, tiny_config  # noqa: E402
from tests.dist.test_train import _assert_same, _fit  # noqa: E402
from tests.token_corpus import documents, tokenizer, write_corpus  # noqa: E402



def test_prepare_train_resume_at_other_cp_export(pools, tmp_path):
    transformers = pytest.importorskip("transformers")
    from ringattn.export import export_hf, load_checkpoint_model

    docs = documents(120)
    tok = tokenizer(tmp_path, docs)
    files = write_corpus(tmp_path / "in", docs)
    prepare_dataset(PrepareConfig(str(tok), [str(f) for f in files], str(tmp_path / "ds")))

    data = {"kind": "tokens", "paths": [str(tmp_path / "ds")], "val_fraction": 0.2}
    ckpt = {"enabled": True, "every": 2, "dir": str(tmp_path / "ckpt")}
    full = tiny_config(str(tmp_path / "ref"), data=data, train={"steps": 4})
    ref = reference_run(full)
    first = tiny_config(
        str(tmp_path / "a"),
        data=data,
        parallel={"dp": 2, "cp": 2},
        train={"steps": 2},
        checkpoint=ckpt,
    )
    run_a = _fit(pools, first)
    torch.testing.assert_close(
        torch.tensor(run_a["losses"]), torch.tensor(ref["losses"][:2]), rtol=2e-5, atol=0
    )
    second = tiny_config(
        str(tmp_path / "b"), data=data, parallel={"cp": 4}, train={"steps": 4}, checkpoint=ckpt
    )
    resumed = _fit(pools, second)
    assert resumed["start_step"] == 2
    _assert_same(resumed, ref, start=2)  # losses of steps 2, 3 and the final parameters

    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    ours = load_checkpoint_model(tmp_path / "ckpt")
    for name, p in ours.named_parameters():  # the checkpoint holds the trained weights
        torch.testing.assert_close(p, resumed["params"][name], rtol=0, atol=0, msg=name)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    tokens = torch.from_numpy(TokenFile(tmp_path / "ds").tokens[:96].astype("int64"))[None]
    with torch.no_grad():
        want, got = ours(tokens), hf.eval()(tokens).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

