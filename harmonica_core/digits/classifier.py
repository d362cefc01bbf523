"""A small CNN digit classifier, trained on the train split only, that scores generated digits.

Its accuracy on generated samples tells whether a "3" looks like a 3; its 128-d penultimate features
feed the Frechet distance to real digits (ALGORITHM.md §6).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .data import NUM_CLASSES, digits_split

CLASSIFIER_FILE = Path(__file__).parent / "weights" / "classifier.safetensors"


class DigitClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 4, 4)
        )  # fmt: skip
        self.features = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 16, 128))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(128, NUM_CLASSES))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 1, 8, 8] in [-1, 1] -> pre-activation features [B, 128] (full rank, for Frechet)."""
        return self.features(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Augment by shifting each batch by up to one pixel (digits are not always centred)."""
    dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)  # background is -1
    return torch.roll(padded, shifts=(dy, dx), dims=(2, 3))[:, :, 1:-1, 1:-1]


def train_classifier(epochs: int = 60, seed: int = 0, out: Path = CLASSIFIER_FILE) -> dict[str, float]:
    """Train on the train split, report held-out accuracy, save weights and the numbers beside them."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train, x_test, y_test = digits_split()
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for batch in order.split(64):
            loss = F.cross_entropy(model(_shift(x_train[batch], generator)), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        train_accuracy = (model(x_train).argmax(1) == y_train).float().mean().item()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(out))
    report = {"test_accuracy": accuracy, "train_accuracy": train_accuracy, "test_images": len(y_test),
              "epochs": epochs, "seed": seed}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def load_classifier(path: Path = CLASSIFIER_FILE) -> DigitClassifier:
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
