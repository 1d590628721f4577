"""One process of the FSDP2 test (tests/test_finetune.py): the run `omnilmm-finetune ARGS` makes in one process,
made here over all processes of a torchrun (gloo, CPU) with the parameters, gradients and optimiser state sharded by
torch's own `fully_shard` (one unit per decoder layer, EVA block and the resampler, as `_no_split_modules` says).

Accelerate (and so `Trainer`, `omnilmm-finetune --fsdp`) turns FSDP on only for accelerator devices; on CPU the
sharding is done here with the same data, loss, clipping, optimiser and schedule as `Trainer`'s, so that the model's
own FSDP2 behaviour is checked on this machine. Writes the merged model as a Hub folder and `train_log.json`.

    torchrun --nproc-per-node 2 tests/fsdp_worker.py ARGS (omnilmm-finetune's: --init-config, --data, --output ...)
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import get_scheduler, set_seed

from omnilmm_tools import finetune


def main(argv):
    args = finetune.parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    set_seed(args.seed)
    model, processor = finetune.load_model_and_processor(args)
    model = finetune.set_trainable(model, args).train()
    dataset = finetune.SupervisedDataset(args.data, processor, args.max_slice_nums, args.max_length, args.bad_sample)
    collate = finetune.Collator(processor.tokenizer.pad_token_id)
    for module in model.modules():
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module)
    fully_shard(model)
    local = sum(p.to_local().numel() for p in model.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=int(args.warmup),
                              num_training_steps=args.max_steps)
    losses, per_step = [], args.batch_size * world
    for step in range(args.max_steps):
        examples = [dataset[i] for i in range(step * per_step, (step + 1) * per_step)]
        batch = collate(examples[rank * args.batch_size : (rank + 1) * args.batch_size])
        labels = batch.pop("labels")[:, 1:]
        num_items = sum(int((e["labels"][1:] != finetune.IGNORE_INDEX).sum()) for e in examples)  # global batch
        logits = model(**batch).logits[:, :-1]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum") / num_items
        (loss * world).backward()  # the gradients are averaged over the processes
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total))
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        merged, _ = finetune.load_model_and_processor(args)
        merged.load_state_dict(state)
        finetune.save_hub_folder(merged, processor, Path(args.output), decoding=args.generation_config)
        full = sum(p.numel() for p in merged.parameters())
        log = {"world_size": world, "fsdp": True, "local_parameter_fraction": local / full,
               "global_step": args.max_steps, "log_history": [{"loss": value} for value in losses]}
        (Path(args.output) / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
