"""Run under torchrun (2 CPU processes, gloo) by tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py store|collective|loss [model_dir]

store:      the group's timeout is 3 s; the main process is 6 s late (the test wraps distributed.share, tests/faults.py);
            q2g's share/wait (store polls, not collectives) still hear it. Exit 0.
collective: the same lateness into a plain gloo broadcast: it times out (the failure q2g avoids).
loss:       the label-only loss through a DDP-wrapped LoRA model equals the one-process loss and
            gradients on the same batch; prints a JSON line with the numbers (rank 0).
"""

import json
import os
import sys
import time

import torch

from q2g import distributed


def store():
    distributed.init(3)
    got = distributed.share({"row": 1} if distributed.is_main() else None)
    distributed.wait()
    # one write per line: under PYTHONUNBUFFERED print writes the text and its newline apart, and
    # the two processes' lines would interleave in the shared pipe
    sys.stdout.write(json.dumps({"rank": int(os.environ["RANK"]), "got": got}) + "\n")
    sys.stdout.flush()


def collective():
    from accelerate.utils import broadcast_object_list

    distributed.init(3)
    if distributed.is_main():
        time.sleep(6)
    broadcast_object_list([{"row": 1}], from_process=0)


def loss(model_dir):
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from q2g.examples import IGNORE_INDEX, Collator
    from q2g.finetune.loss import LossPath, label_only_loss

    distributed.init(60)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(base, lora)
    single = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    rows = []
    for n, p in ((9, 3), (14, 4), (19, 5)):
        ids = torch.randint(3, 200, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    batch = Collator(0)(rows)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    path = LossPath("auto")
    total, n = label_only_loss(ddp, model, batch, 4, path)
    (total / n).backward()  # the same batch on both ranks: the averaged gradient is the batch's own
    plain = single(**batch).loss
    plain.backward()
    grads = [
        (p.grad - q.grad).abs().max().item()
        for p, q in zip(model.parameters(), single.parameters(), strict=True)
        if p.requires_grad
    ]
    if distributed.is_main():
        print(
            json.dumps(
                {"loss_ddp": (total / n).item(), "loss_plain": plain.item(), "grad_diff": max(grads), **path.info()}
            ),
            flush=True,
        )


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "loss":
        loss(sys.argv[2])
    else:
        {"store": store, "collective": collective}[mode]()
