"""``model.compile``: the ALBEF forward and backward run with every transformer block under ``torch.compile``
and give the eager losses and gradients.

The blocks are traced by TorchDynamo and AOTAutograd (``backend="aot_eager"``), which is where code stops
being compilable (graph breaks on data-dependent Python, unsupported ops, mutated inputs); code generation
by Inductor is left out because compiling C++ kernels on CPU takes minutes, and the speed of compiled
blocks is measured on a GPU by ``benchmarks/bare_loop.py --compile on``.
"""

from __future__ import annotations

import torch

from pretrain.runtime import compile_blocks
from tests.pretrain.test_build import tiny_task

TEXTS = ["a red circle", "two blue squares", "a green triangle", "one small square"]


def losses_and_grads(task, batch):
    task.set_step(0)
    losses = task(batch)
    losses["loss"].backward()
    grads = {name: parameter.grad.clone() for name, parameter in task.named_parameters() if parameter.grad is not None}
    return {name: value.detach() for name, value in losses.items()}, grads


def test_compiled_blocks_give_the_eager_losses_and_gradients():
    eager, tokenizer = tiny_task("objectives.itc.queue_size=8", micro_batch=4)
    compiled, _ = tiny_task("objectives.itc.queue_size=8", micro_batch=4)
    eager.train()
    compiled.train()
    counted = compile_blocks(compiled.model, *compiled.momentum.modules.values(), backend="aot_eager")
    model = compiled.model
    assert counted == 2 * (len(model.visual_encoder.blocks) + len(model.text_encoder.bert.encoder.layer))  # + momentum
    torch.manual_seed(1)
    batch = {"image": torch.randn(4, 3, 32, 32), **tokenizer(TEXTS)}

    torch.manual_seed(2)  # the same dropout, masking and negatives in both
    eager_losses, eager_grads = losses_and_grads(eager, batch)
    torch.manual_seed(2)
    compiled_losses, compiled_grads = losses_and_grads(compiled, batch)
    assert set(compiled_losses) == {"loss", "itc", "itm", "mlm"}
    for name, value in eager_losses.items():
        torch.testing.assert_close(compiled_losses[name], value, rtol=1e-5, atol=1e-6)
    assert set(compiled_grads) == set(eager_grads)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    names = {name for name, _ in compiled.state_dict().items()}
    assert names == set(eager.state_dict())  # checkpoints keep their keys
