"""dist_finetune: Flash-style finetuning of pretrained vision models on HuggingFace Accelerate.

    data = ImageClassificationData.from_folders("data/train", "data/val", image_size=224)
    task = ImageClassifier(num_classes=data.num_classes, backbone="resnet18")
    Trainer(max_epochs=10).finetune(task, data, strategy="freeze_unfreeze")
"""

__version__ = "0.1.0"

from accelerate.utils import set_seed as seed_everything  # noqa: E402  (seed before building a task)

from .data import ImageClassificationData  # noqa: E402
from .task import ImageClassifier  # noqa: E402
from .trainer import Trainer  # noqa: E402

__all__ = ["ImageClassificationData", "ImageClassifier", "Trainer", "seed_everything", "__version__"]
