"""Attention the matcher finds but cannot describe (here a clamp between the scores and softmax)
runs as written; sparsec.explain lists it with the reason, and a warning names it
when patterns or a plan were asked for, since they cannot reach it."""
from __future__ import annotations

import logging

import torch
from torch import nn

from sparsec import patterns as P
from sparsec.explain import explain
from sparsec.ir.ops import Attention

HEADS, SEQ, DIM = 2, 12, 8


class ClampedAttention(nn.Module):
    """Scores clamped before softmax: hard capping, which sparsec's kernels do not do."""

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) * DIM ** -0.5
        return scores.clamp(-0.5, 0.5).softmax(-1) @ v


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.capped = ClampedAttention()
        self.plain = nn.MultiheadAttention(HEADS * DIM, HEADS, batch_first=True)

    def forward(self, q, k, v):
        x = self.capped(q, k, v).transpose(1, 2).flatten(2)
        return self.plain(x, x, x, need_weights=False)[0]


def _inputs():
    return tuple(torch.randn(1, HEADS, SEQ, DIM) for _ in range(3))


def test_explain_lists_unmatched_attention_with_its_reason():
    report = explain(Model().eval(), *_inputs(), options={"inner": "eager"})
    (record,) = report.graphs
    assert [u.module_path for u in record.unmatched_attention] == ["capped"]
    assert "clamp" in record.unmatched_attention[0].reason
    assert len(record.final_ir.ops_of(Attention)) == 1  # the plain layer is matched
    assert "attention capped (" in report.summary() and "not matched, runs as written" in report.summary()


def test_a_warning_names_it_when_patterns_are_asked_for(caplog):
    model, inputs = Model().eval(), _inputs()
    want = model(*inputs)
    for options, warned in (({"inner": "eager"}, False),
                            ({"inner": "eager", "attention_patterns": {"*": P.Window(2, 2)}}, True)):
        torch._dynamo.reset()
        caplog.clear()
        with torch.no_grad(), caplog.at_level(logging.WARNING, logger="sparsec"):
            got = torch.compile(model, backend="sparsec", options=options)(*inputs)
        assert ("attention capped" in caplog.text and "clamp" in caplog.text) == warned, caplog.text
        if not warned:  # dense everywhere: the model's result
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
