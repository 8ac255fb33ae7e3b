"""trainer.compile (docs/performance.md): decoder layers compile whole (fullgraph, so a graph break is an error),
dense and MoE, with activation checkpointing inside the compiled region and token dropping on; and a compiled run
of the trainer follows the eager one, at ep=1 and under expert parallelism (the all-to-all dispatcher)."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from model import CausalLM, next_token_labels
from tests.trainer.test_pretrain_e2e import _ok, metrics, run_pretrain
from trainer.compile import apply_compile
from trainer.presets import model_preset

LOSS_RTOL = 1e-4


def test_dense_and_moe_layers_compile_without_a_graph_break():
    """fullgraph=True raises on any graph break; the traced model's loss and gradients equal eager's. Traced by
    dynamo and AOT autograd (forward and backward graphs) without inductor's code generation, which the training
    test below runs."""
    torch.manual_seed(0)
    config = model_preset("tiny", num_hidden_layers=2, vocab_size=512)  # layer 0 dense, layer 1 MoE
    eager = CausalLM(config).train()
    compiled = CausalLM(config).train()
    compiled.load_state_dict(eager.state_dict())
    for model in (eager, compiled):
        model.set_token_dropping(1.0, no_drop_fraction=0.5)
        model.activation_checkpointing = True
    counters.clear()
    assert apply_compile(compiled, True, torch.device("cpu"), backend="aot_eager")
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (eager, compiled):
        out = model(ids, labels=next_token_labels(ids))
        (out.loss + out.aux_loss).backward()
        results.append((out.loss.item(), out.aux_loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 3  # the dense layer, the MoE layer and the loss
    (loss, aux, grads), (c_loss, c_aux, c_grads) = results
    assert abs(c_loss - loss) <= 1e-5 * loss and abs(c_aux - aux) <= 1e-5 * aux
    for name, grad in grads.items():
        torch.testing.assert_close(c_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _losses(run) -> list[float]:
    return [m["loss"] for _, m in sorted(metrics(run).items())]


def test_compiled_training_follows_eager_at_ep1_and_ep2(tmp_path, cache_dir):
    """5 steps of the tiny preset, one process and two (ep=2: the all-to-all dispatcher compiled with its split
    sizes as unbacked sizes): every step's loss within 1e-4 relative of the eager run's. The ep=2 run reuses the
    dense layer's and the loss's compiled code from the ep=1 run (inductor's cache)."""
    common = ("model=tiny", "trainer.max_steps=5", "checkpoint.every=0", "trainer.val_every=0",
              "checkpoint.export_hf=false")

    def run(nproc: int, mode: str) -> list[float]:
        run_dir = tmp_path / f"{nproc}-{mode}" / "run"
        run_dir.parent.mkdir()
        out = _ok(run_pretrain(run_dir, cache_dir, *common, f"trainer.compile={mode}", nproc=nproc, timeout=900))
        assert f"expert-parallel {nproc}" in out.stdout
        return _losses(run_dir)

    eager = {nproc: run(nproc, "false") for nproc in (1, 2)}
    compiled = {nproc: run(nproc, "true") for nproc in (1, 2)}
    for nproc in (1, 2):
        assert len(compiled[nproc]) == 5
        for step, (e, c) in enumerate(zip(eager[nproc], compiled[nproc], strict=True), 1):
            assert abs(c - e) <= LOSS_RTOL * e, (nproc, step, c, e)
