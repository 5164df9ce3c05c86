"""Preemption (dist_finetune/preemption.py): where signals cannot be handled, the run says so."""

from __future__ import annotations

import threading
import warnings

from conftest import task, tiny_trainer


def test_finetune_outside_the_main_thread_warns_that_preemption_is_off(tiny_data):
    caught = []

    def run():
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            tiny_trainer(max_epochs=1).finetune(task(), tiny_data, "freeze")
        caught.extend(str(w.message) for w in seen)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert any("outside the main thread" in message and "preemption handling is off" in message
               for message in caught), caught
