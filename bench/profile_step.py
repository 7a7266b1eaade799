"""Where the time of one training step goes: ``torch.profiler`` over ``trainer.training_step`` (forward and
backward of one batch), for either library, with the benchmark's model, data and settings.

    python bench/profile_step.py --lib hfrlhf --task dpo --batch 2 --threads 1 --precision fp32
    python bench/profile_step.py --lib trl --task reward --batch 2 --threads 1 --precision fp32 --rows 30

Prints the top operators by self CPU time, the number of matmul calls and the wall time of the profiled
step (after one unprofiled warm-up step on another batch). ``--timed K`` first times K unprofiled steps on
the same batch; ``--rows 0`` skips the profile; ``--shapes K`` adds the top K operators grouped by input shapes;
``--no-blocks 1`` runs the 4D mask's attention instead of ``attention_blocks``.
"""

from __future__ import annotations

import os
import resource
import sys
import time

from worker import build_trainer, parse_args


def main() -> None:
    argv = sys.argv[1:]
    opts = {"--rows": 25, "--timed": 0, "--shapes": 0, "--no-blocks": 0}
    for key in opts:
        if key in argv:
            i = argv.index(key)
            opts[key] = int(argv[i + 1])
            del argv[i : i + 2]
    rows = opts["--rows"]
    a = parse_args(argv + ["--steps", "1", "--warmup", "1"])

    import torch
    from torch.profiler import ProfilerActivity, profile

    if opts["--no-blocks"]:  # the 4D mask's attention, for comparison
        import contextlib

        import hfrlhf.ops.logprobs as logprobs

        logprobs.blocked_attention = lambda model, blocks: contextlib.nullcontext(False)
    trainer, *_ = build_trainer(a)
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by train() otherwise
    loader = iter(trainer.get_train_dataloader())
    warm, batch = next(loader), next(loader)
    t = time.perf_counter()
    trainer.training_step(model, warm)
    print(f"warm-up step: {time.perf_counter() - t:.2f} s")
    for _ in range(opts["--timed"]):
        model.zero_grad(set_to_none=True)
        t, c = time.perf_counter(), time.process_time()
        trainer.training_step(model, batch)
        print(f"timed step: {time.perf_counter() - t:.2f} s wall, {time.process_time() - c:.2f} s CPU, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    model.zero_grad(set_to_none=True)
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GB")
    if rows == 0:
        return
    with profile(activities=[ProfilerActivity.CPU], record_shapes=bool(opts["--shapes"])) as prof:
        t = time.perf_counter()
        trainer.training_step(model, batch)
        wall = time.perf_counter() - t
    print(f"profiled step: {wall:.2f} s (threads {torch.get_num_threads()})")
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    mm = [e for e in averages if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")]
    print("matmul calls:", {e.key: e.count for e in mm},
          f"self time share {100 * sum(e.self_cpu_time_total for e in mm) / total:.0f}%")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows))
    if opts["--shapes"]:
        by_shape = prof.key_averages(group_by_input_shape=True)
        print(by_shape.table(sort_by="self_cpu_time_total", row_limit=opts["--shapes"], max_name_column_width=30,
                             max_shapes_column_width=60))


if __name__ == "__main__":
    main()
