"""Classify images with a trained model's checkpoint.

Usage: python prediction_for_one.py --model RUN/student_kd/best_model.pth IMAGE [IMAGE ...]
       python prediction_for_one.py --model RUN/student_kd/model.onnx IMAGE [IMAGE ...]   (ONNX Runtime)
       (--model_path is accepted as well; --top-k N; --json for machine-readable output)

Class names, image size and normalization are read from the checkpoint (or the ONNX file's metadata).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import data_setup
import model_builder
import utils


class PredictionError(Exception):
    """A problem with the model file that stops prediction with one clear sentence."""


Classifier = Callable[[torch.Tensor], torch.Tensor]  # normalized images (N, 3, S, S) -> logits (N, C)


DESCRIPTION_KEYS = ("class_names", "image_size", "mean", "std")  # what prediction needs besides weights


def _brief(error: BaseException, limit: int = 160) -> str:
    """The first sentence of an error message, on one line (PyTorch's can run to paragraphs)."""
    text = " ".join(str(error).split())
    text = text.split(". ")[0].rstrip(".") if text else ""
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rebuild(checkpoint: dict[str, Any]) -> nn.Module:
    """The model a checkpoint describes, with its weights, on the CPU in eval mode."""
    model = model_builder.build_model(checkpoint["arch"], checkpoint["num_classes"], checkpoint["image_size"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def load_model(path: str | Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a self-describing checkpoint; returns the model (eval mode) and checkpoint."""
    checkpoint = utils.load_checkpoint(path, map_location="cpu")
    return _rebuild(checkpoint).to(device), checkpoint


def _check_description(path: Path, description: Any, keys: tuple[str, ...]) -> None:
    if not isinstance(description, dict):
        raise PredictionError(f"'{path}' is not a usable model file of this project: it holds a "
                              f"{type(description).__name__}, not a checkpoint written by experiment.py.")
    missing = [key for key in keys if key not in description]
    if missing:
        raise PredictionError(f"'{path}' is not a usable model file of this project: it lacks "
                              f"{', '.join(repr(key) for key in missing)} "
                              f"(is it a best_model.pth written by experiment.py?).")


def load_classifier(path: str | Path, device: torch.device) -> tuple[Classifier, dict[str, Any]]:
    """A classifier and its description from a best_model.pth checkpoint or an exported model.onnx.

    Any problem with the file (missing, a folder, truncated, random bytes, a foreign checkpoint,
    weights that do not fit) raises PredictionError with one sentence.
    """
    path = Path(path)
    if path.is_dir():
        raise PredictionError(f"Model file '{path}' is a folder; give the best_model.pth or model.onnx inside it.")
    if not path.is_file():
        raise PredictionError(f"Model file '{path}' does not exist.")
    unusable = f"'{path}' is not a usable model file of this project"
    if path.suffix.lower() == ".onnx":
        try:
            session = utils.onnx_session(path)
            description = utils.onnx_metadata(session)
        except Exception as error:  # a foreign or damaged file is the user's to fix
            raise PredictionError(f"{unusable}: it cannot be read as an exported model ({_brief(error)}).") from None
        _check_description(path, description, DESCRIPTION_KEYS)
        return (lambda images: utils.onnx_logits(session, images)), description
    try:
        checkpoint = utils.load_checkpoint(path, map_location="cpu")
    except Exception as error:
        raise PredictionError(f"{unusable}: it is damaged, truncated or not a checkpoint ({_brief(error)}).") from None
    _check_description(path, checkpoint, ("arch", "num_classes", "state_dict", *DESCRIPTION_KEYS))
    try:
        model = _rebuild(checkpoint)
    except Exception as error:
        raise PredictionError(f"{unusable}: its weights do not rebuild a {checkpoint['arch']!r} model "
                              f"({_brief(error)}).") from None
    try:
        model = model.to(device)
    except Exception as error:
        raise PredictionError(f"Device '{device}' is not usable here ({_brief(error)}).") from None
    return (lambda images: model(images.to(device)).float().cpu()), checkpoint


@torch.inference_mode()
def predict_images(
    classify: Classifier, description: dict[str, Any], image_paths: list[str], top_k: int
) -> list[dict[str, Any]]:
    """Top-k classes with probabilities for each image; unreadable images get an 'error' entry."""
    mean = torch.tensor(description["mean"]).view(3, 1, 1)
    std = torch.tensor(description["std"]).view(3, 1, 1)
    class_names = description["class_names"]
    k = min(top_k, len(class_names))
    predictions = []
    for image_path in image_paths:
        try:
            pixels = data_setup.decode_image(image_path, description["image_size"])
        except data_setup.UnreadableImage as error:  # missing, a folder, not an image, damaged
            predictions.append({"image": image_path, "error": f"cannot read image: {error}"})
            continue
        image = (pixels.float() / 255 - mean) / std
        probabilities = torch.softmax(classify(image[None]).float(), dim=1)[0]
        top = probabilities.topk(k)
        predictions.append({
            "image": image_path,
            "top": [
                {"class": class_names[i], "probability": round(p, 6)}
                for p, i in zip(top.values.tolist(), top.indices.tolist())
            ],
        })
    return predictions


def format_predictions(predictions: list[dict[str, Any]]) -> str:
    """Readable text: each image followed by its top classes and probabilities."""
    lines = []
    for prediction in predictions:
        lines.append(prediction["image"])
        if "error" in prediction:
            lines.append(f"  error: {prediction['error']}")
            continue
        for rank, entry in enumerate(prediction["top"], start=1):
            lines.append(f"  {rank}. {entry['class']:<20} {100 * entry['probability']:6.2f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Classify the given images; exit 0 when all were classified, 1 when some could not be read
    (the others are still classified; each bad one is named on stderr), 2 for a bad model file."""
    parser = argparse.ArgumentParser(description="Classify images with a trained checkpoint (best_model.pth).")
    parser.add_argument("--model", "--model_path", dest="model", required=True, help="path to a best_model.pth or model.onnx")
    parser.add_argument("images", nargs="+", help="image files to classify")
    parser.add_argument("--top-k", type=int, default=3, help="how many classes to show per image")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    # The shell leaves '~' alone in --model=~/x; expand it as a user expects.
    args.model, args.images = os.path.expanduser(args.model), [os.path.expanduser(image) for image in args.images]
    if args.top_k < 1:
        print("error: --top-k must be at least 1.", file=sys.stderr)
        return 2
    try:
        classify, description = load_classifier(args.model, torch.device(args.device))
    except (PredictionError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    predictions = predict_images(classify, description, args.images, args.top_k)
    print(json.dumps(predictions, indent=2) if args.json else format_predictions(predictions))
    failed = [p for p in predictions if "error" in p]
    for prediction in failed:
        print(f"error: '{prediction['image']}': {prediction['error']}", file=sys.stderr)
    if failed and len(failed) < len(predictions):
        print(f"{len(failed)} of {len(predictions)} images could not be read; the others were classified.",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
