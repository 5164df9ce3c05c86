"""A finetuning run that can be made to die or be signalled at a chosen optimizer step (test_resume.py).

    python resume_worker.py DATA OUT [--kill-at N] [--signal-at N] [--resume latest] [--strategy S]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch.distributed as dist

from dist_finetune import ImageClassificationData, ImageClassifier, Trainer, seed_everything
from dist_finetune.resume import PREEMPTED_EXIT_CODE, TrainingPreempted


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--kill-at", type=int, default=-1, help="SIGKILL this process before step N is saved")
    parser.add_argument("--signal-at", type=int, default=-1, help="SIGUSR1 to rank 0 during step N")
    parser.add_argument("--resume")
    parser.add_argument("--strategy", default="freeze_unfreeze")
    parser.add_argument("--backbone", default="resnet18")
    args = parser.parse_args()

    original = Trainer._after_step

    def after_step(self, optimizer, schedule, position, *rest):
        rank = dist.get_rank() if dist.is_initialized() else 0
        if position.global_step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if position.global_step == args.signal_at and rank == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, optimizer, schedule, position, *rest)

    Trainer._after_step = after_step
    data = ImageClassificationData.from_folders(f"{args.data}/train", f"{args.data}/val", image_size=32,
                                                batch_size=4, num_workers=1)
    seed_everything(0)
    task = ImageClassifier(data.num_classes, backbone=args.backbone, pretrained=False, head_dropout=0.2)
    trainer = Trainer(max_epochs=3, lr=1e-2, seed=0, progress_bar=False, output_dir=args.out, save_every_n_steps=1,
                      keep_last=3)
    strategy = ("freeze_unfreeze", 1) if args.strategy == "freeze_unfreeze" else args.strategy
    try:
        trainer.finetune(task, data, strategy=strategy, resume=args.resume)
    except TrainingPreempted as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
