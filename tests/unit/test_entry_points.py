"""The public entry points agree: the same layout default and the same validation message
for the same bad input (single process)."""

from __future__ import annotations

import inspect

import pytest
import torch

from ringattn import context_parallel_attention, ring_attention


def test_same_layout_default_zigzag():
    for fn in (ring_attention, context_parallel_attention):
        assert inspect.signature(fn).parameters["layout"].default == "zigzag"


def test_default_is_zigzag_not_contiguous():
    # an odd local length is fine for contiguous, rejected by zigzag: the default must reject
    q = torch.randn(1, 7, 2, 8)
    ring_attention(q, q, q, layout="contiguous")
    for fn in (ring_attention, context_parallel_attention):
        with pytest.raises(ValueError, match="layout='zigzag' needs an even local length"):
            fn(q, q, q)


def _message(fn, *args, **kw) -> str:
    with pytest.raises(ValueError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    name = fn.__name__
    return msg.split(": ", 1)[1] if msg.startswith(name) else msg  # drop the entry's name


@pytest.mark.parametrize(
    "args,kw",
    [
        ((torch.randn(1, 8, 3, 8), torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8)), {}),
        ((torch.randn(8, 2, 8),) * 3, {}),
        ((torch.randn(1, 8, 2, 8),) * 3, dict(layout="snake")),
        ((torch.randn(1, 8, 2, 8),) * 3, dict(kernel="triton")),
        ((torch.randn(1, 8, 2, 8),) * 3, dict(grad_precision="half")),
    ],
)
def test_same_validation_messages(args, kw):
    assert _message(ring_attention, *args, **kw) == _message(
        context_parallel_attention, *args, **kw
    )


def test_same_grad_precision_default_auto():
    for fn in (ring_attention, context_parallel_attention):
        assert inspect.signature(fn).parameters["grad_precision"].default == "auto"


def test_grad_precision_message_names_the_argument():
    q = torch.randn(1, 8, 2, 8)
    with pytest.raises(ValueError, match=r"grad_precision='half' is unknown.*'exact'"):
        ring_attention(q, q, q, grad_precision="half")


@pytest.mark.parametrize(
    "option,value",
    [("parallel.grad_precision", "half"), ("parallel.kernel", "triton")],
)
def test_config_rejects_unknown_choice(option, value):
    from ringattn.train.config import load_config

    with pytest.raises(ValueError, match=rf"{option}='{value}' is unknown"):
        load_config(None, [f"--{option}={value}"])
