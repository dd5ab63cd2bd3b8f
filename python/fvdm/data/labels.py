"""Class labels from the folder layout (UCF101: root/<ClassName>/<video>)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from fvdm.errors import UserError


class LabelledByFolder(Dataset):
    """Items (video, class id) of a VideoFolder / FrameFolders, the class being the first
    folder under the root; ids follow the sorted class names (`classes`)."""

    def __init__(self, dataset, num_classes: int | None = None):
        self.dataset = dataset
        tops = [p.relative_to(dataset.root).parts for p, _ in dataset.sources]
        if any(len(parts) < 2 for parts in tops):
            raise UserError(f"class-conditional data needs root/<class>/<video>; {dataset.root} has videos "
                            "directly under the root")
        self.classes = sorted({parts[0] for parts in tops})
        self.labels = [self.classes.index(parts[0]) for parts in tops]
        if num_classes is not None and len(self.classes) != num_classes:
            raise UserError(f"model.num_classes is {num_classes} but {dataset.root} has {len(self.classes)} class "
                            "folders")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.dataset[i], self.labels[i]

    def describe(self) -> dict:
        return {**self.dataset.describe(), "labels": "folder", "classes": self.classes}
