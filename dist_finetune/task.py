"""The image-classification task: a pretrained backbone plus a new head, and prediction on files.

``forward`` takes uint8 images (what the data loaders yield) or float images in [0, 1] and applies
the backbone's normalisation itself, so saved models carry their own preprocessing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import __version__
from .backbones import Backbone, build_backbone, layer_groups
from .checkpoint import check_state_dict_matches, load_model, save_model
from .errors import CheckpointError, ConfigError
from .finetuning import keep_frozen_norms_in_eval
from .images import list_image_files
from .lora import load_adapter_into, merged_state_dict, save_adapter
from .prediction import predict_paths, select_device
from .sharding import shard_state_dict


class ClassifierHead(nn.Module):
    """Linear head, with optional dropout and one hidden layer."""

    def __init__(self, num_features: int, num_classes: int, hidden: int | None = None, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        if hidden:
            layers += [nn.Linear(num_features, hidden), nn.ReLU(inplace=True)]
            layers += [nn.Dropout(dropout)] if dropout > 0 else []
            num_features = hidden
        layers.append(nn.Linear(num_features, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class ImageClassifier(nn.Module):
    """``backbone`` (pretrained feature extractor) + ``head`` (new classifier)."""

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        pretrained: bool = True,
        weights: str | None = None,
        head_hidden: int | None = None,
        head_dropout: float = 0.0,
        labels: Sequence[str] | None = None,
        image_size: int = 224,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if labels is not None and len(labels) != num_classes:
            raise ValueError(f"{len(labels)} labels given for num_classes={num_classes}")
        spec: Backbone = build_backbone(backbone, pretrained=pretrained, weights=weights)
        self.backbone = spec.module
        self.head = ClassifierHead(spec.num_features, num_classes, head_hidden, head_dropout)
        self.backbone_name = spec.name
        self.layer_names = spec.layer_names
        self.fixed_image_size = spec.fixed_image_size
        self.is_convnet = spec.is_convnet
        self.num_classes = num_classes
        self.num_features = spec.num_features
        self.head_hidden = head_hidden
        self.head_dropout = head_dropout
        self.labels = list(labels) if labels is not None else [str(i) for i in range(num_classes)]
        self.image_size = image_size
        self.class_weights: list[float] | None = None  # the training loss's class weights (Trainer sets them)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    # --------------------------------------------------------------------------- model

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        return (images - self.mean) / self.std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def train(self, mode: bool = True) -> "ImageClassifier":
        super().train(mode)
        if mode:
            keep_frozen_norms_in_eval(self)
        return self

    def check_data(self, data, scoring: bool = False) -> None:
        """Refuse data this model cannot take, before any step: another class count than its outputs (a label
        past the outputs fails deep in the loss, a device assert on GPU; extra outputs give a model file that
        cannot be loaded), or an input size the backbone cannot take (learned position embeddings).
        ``scoring`` (validate, evaluate): a model that knows its class names must be scored on data labelled
        with those names in its order, else every metric would compare the wrong classes."""
        if data.num_classes != self.num_classes:
            raise ConfigError(
                f"the model has num_classes={self.num_classes} outputs but the data has {data.num_classes} classes "
                f"({', '.join(data.classes)}); build it with ImageClassifier(num_classes=data.num_classes, ...)"
            )
        named = list(self.labels) != [str(i) for i in range(self.num_classes)]  # not the placeholder names
        if scoring and named and list(self.labels) != list(data.classes):
            raise ConfigError(
                f"the model's classes are {list(self.labels)} but the data's are {list(data.classes)}: scores would "
                "compare the wrong classes. Label the data with the model's classes, in its order (dist-finetune "
                "evaluate --checkpoint FILE --data-folder DIR maps them by name)"
            )
        if self.fixed_image_size is not None and data.image_size != self.fixed_image_size:
            raise ConfigError(
                f"backbone {self.backbone_name} takes {self.fixed_image_size}px images (learned position "
                f"embeddings) but the data is set to image_size={data.image_size}; use "
                f"image_size={self.fixed_image_size}"
            )

    def backbone_layers(self) -> list[nn.Module]:
        """The backbone's coarse parameter-holding blocks, input to output (see ``backbones``)."""
        return layer_groups(self.backbone, self.layer_names)

    # ---------------------------------------------------------------------- checkpoints

    def metadata(self) -> dict:
        return {
            "backbone": self.backbone_name,
            "num_classes": self.num_classes,
            "labels": self.labels,
            "image_size": self.image_size,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            "head_hidden": self.head_hidden,
            "head_dropout": self.head_dropout,
            "class_weights": self.class_weights,
            "library_version": __version__,
        }

    def save_checkpoint(self, path: str | os.PathLike, training: dict | None = None,
                        weights: dict[str, torch.Tensor] | None = None) -> None:
        """Write weights + metadata as one safetensors file (atomically); while LoRA adapters train, also
        ``<name>.adapter.safetensors``, the adapters and head alone (see ``lora``).

        ``training``: what to record of the epoch the weights come from (its number and metrics).
        ``weights``: whole tensors to write instead of this process's (the Trainer gathers them: ``lora.file_weights``).
        """
        metadata = self.metadata() if training is None else {**self.metadata(), "training": training}
        save_model(path, merged_state_dict(self) if weights is None else weights, metadata)
        save_adapter(self, path, metadata)

    @classmethod
    def load_from_checkpoint(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "ImageClassifier":
        """Rebuild the classifier from a file written by :meth:`save_checkpoint`; nothing else is needed.

        ``map_location``: where the weights go ("cpu", "cuda", "cuda:1", or "auto": the GPU if there is one).
        """
        map_location = select_device(map_location)
        state, meta = load_model(path, map_location)
        model = cls._from_metadata(meta, pretrained=False)
        model.load_weights(state, str(path))
        return model.to(map_location).eval()

    @classmethod
    def load_adapter(cls, path: str | os.PathLike, weights: str | None = None,
                     map_location: str | torch.device = "cpu") -> "ImageClassifier":
        """The model a LoRA run's ``*.adapter.safetensors`` was saved from: the pretrained backbone (or
        ``weights``, a local backbone file) with the adapters merged in and the head loaded; needs peft."""
        map_location = select_device(map_location)
        state, meta = load_model(path, "cpu")
        if "lora" not in meta:
            raise CheckpointError(f"{path} is not a LoRA adapter file (it has no LoRA settings); load a model file "
                                  "with ImageClassifier.load_from_checkpoint")
        model = cls._from_metadata(meta, pretrained=True, weights=weights)
        load_adapter_into(model, state, meta["lora"], str(path))
        return model.to(map_location).eval()

    @classmethod
    def _from_metadata(cls, meta: dict, pretrained: bool, weights: str | None = None) -> "ImageClassifier":
        """The classifier a model or adapter file's metadata describes, with its preprocessing."""
        model = cls(num_classes=meta["num_classes"], backbone=meta["backbone"], pretrained=pretrained, weights=weights,
                    head_hidden=meta.get("head_hidden"), head_dropout=meta.get("head_dropout", 0.0),
                    labels=meta["labels"], image_size=meta["image_size"])
        model.mean.copy_(torch.tensor(meta["mean"]).view(1, 3, 1, 1))
        model.std.copy_(torch.tensor(meta["std"]).view(1, 3, 1, 1))
        model.class_weights = meta.get("class_weights")
        return model

    def load_weights(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load whole tensors (a model file, a checkpoint), each rank keeping its slice of sharded ones."""
        current = self.state_dict()
        check_state_dict_matches(current, state, source)
        self.load_state_dict(shard_state_dict(state, current))

    # ------------------------------------------------------------------------- predict

    def predict_with_scores(self, paths: Sequence[str], batch_size: int = 32, device: str | torch.device | None = None,
                            num_workers: int | None = None, tta: str = "none") -> list[tuple[str, float]]:
        """(label, probability) for each image path, in order; an unreadable file raises ``DataError``.

        ``device``: None runs where the model is, or on the GPU (when there is one) if the model is on the
        CPU; the model is moved there. Decoding is validation's (see :mod:`dist_finetune.prediction`). ``tta``:
        ``"flip"`` averages the probabilities of each image and its mirror image.
        """
        rows = predict_paths(self, [str(p) for p in paths], batch_size=batch_size, device=device,
                             num_workers=num_workers, tta=tta)
        return [(row.label, row.probability) for row in rows]

    def predict(self, source: str | os.PathLike | Sequence[str], batch_size: int = 32,
                device: str | torch.device | None = None, tta: str = "none"):
        """A label for a file, a list of labels for a list, ``{path: label}`` for a folder (recursive);
        ``tta`` as in :meth:`predict_with_scores`."""
        if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
            paths = list_image_files(source)
            scored = self.predict_with_scores(paths, batch_size, device, tta=tta)
            return dict(zip(paths, (label for label, _ in scored)))
        if isinstance(source, (str, os.PathLike)):
            return self.predict_with_scores([str(source)], batch_size, device, tta=tta)[0][0]
        return [label for label, _ in self.predict_with_scores(source, batch_size, device, tta=tta)]
