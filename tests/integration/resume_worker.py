"""A finetuning run that can be made to die or be signalled at a chosen optimizer step (test_resume_killed.py).

    python resume_worker.py DATA OUT [--kill-at N] [--signal-at N] [--resume latest] [--strategy S]

It writes ``OUT/first_step_rankR.json``: the first optimizer step this process ran, which proves a
resumed run continued where it stopped instead of training again from the start.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import tiny_resnet  # noqa: F401  (registers the test backbone)

from dist_finetune import ImageClassificationData, ImageClassifier, Trainer, seed_everything
from dist_finetune.callbacks import Callback
from dist_finetune.preemption import PREEMPTED_EXIT_CODE, TrainingPreempted


class Saboteur(Callback):
    """SIGKILLs this process after step ``kill_at`` (before it is saved), or SIGUSR1s rank 0 during ``signal_at``."""

    def __init__(self, out: str, kill_at: int, signal_at: int):
        self.out, self.kill_at, self.signal_at = Path(out), kill_at, signal_at
        self.first_step = None

    def on_step_end(self, trainer, run) -> None:
        step, rank = run.position.global_step, run.accelerator.process_index
        if self.first_step is None:
            self.first_step = step
            # the tensors the DDP wrapper all-reduces: fixed when it was built, so a missed rebuild shows
            ddp = run.model._get_ddp_logging_data() if hasattr(run.model, "_get_ddp_logging_data") else {}
            (self.out / f"first_step_rank{rank}.json").write_text(json.dumps(
                {"step": step, "resumed_from": str(run.resumed_from) if run.resumed_from else None,
                 "param_groups": len(run.optimizer.param_groups),
                 "ddp_covers_trainable": ddp.get("num_parameter_tensors") == sum(
                     p.requires_grad for p in run.task.parameters())}))
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.signal_at and rank == 0:
            os.kill(os.getpid(), signal.SIGUSR1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--kill-at", type=int, default=-1, help="SIGKILL this process before step N is saved")
    parser.add_argument("--signal-at", type=int, default=-1, help="SIGUSR1 to rank 0 during step N")
    parser.add_argument("--resume")
    parser.add_argument("--strategy", default="freeze_unfreeze")
    parser.add_argument("--backbone", default="tiny_resnet")
    args = parser.parse_args()

    Path(args.out).mkdir(parents=True, exist_ok=True)
    data = ImageClassificationData.from_folders(f"{args.data}/train", f"{args.data}/val", image_size=32,
                                                batch_size=4, num_workers=1)
    seed_everything(0)
    task = ImageClassifier(data.num_classes, backbone=args.backbone, pretrained=False, head_dropout=0.2)
    trainer = Trainer(max_epochs=3, lr=1e-2, seed=0, progress_bar=False, output_dir=args.out, save_every_n_steps=1,
                      keep_last=3, log_every_n_steps=1, callbacks=[Saboteur(args.out, args.kill_at, args.signal_at)])
    strategy = ("freeze_unfreeze", 1) if args.strategy == "freeze_unfreeze" else args.strategy
    try:
        trainer.finetune(task, data, strategy=strategy, train_bn=True, resume=args.resume)
    except TrainingPreempted as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
