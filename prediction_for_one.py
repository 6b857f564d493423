"""Classify images with a trained model's checkpoint.

Usage: python prediction_for_one.py --model RUN/student_kd/best_model.pth IMAGE_OR_FOLDER [...]
       python prediction_for_one.py --model RUN/student_kd/model.onnx IMAGE_OR_FOLDER [...]   (ONNX Runtime)
       (--model_path is accepted as well; --top-k N; --json for machine-readable output;
        --csv FILE for one row per image)

Folders are searched recursively for image files. Class names, image size, resize mode and
normalization are read from the checkpoint (or the ONNX file's metadata).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

import utils
from core import errors
from data import decoding, folders
from results import deploy
from training import checkpoints


class PredictionError(Exception):
    """A problem with the model file that stops prediction with one clear sentence."""


def brief(error: BaseException) -> str:
    """An error's type and first sentence, short enough for a one-line message about a model file."""
    return errors.one_line(error, limit=160, brief=True)


Classifier = Callable[[torch.Tensor], torch.Tensor]  # normalized images (N, 3, S, S) -> logits (N, C)


BATCH_SIZE = 64  # images per forward pass


def load_classifier(path: str | Path, device: torch.device) -> tuple[Classifier, dict[str, Any]]:
    """A classifier and its description from a best_model.pth checkpoint or an exported model.onnx.

    Any problem with the file (missing, a folder, truncated, random bytes, a foreign checkpoint, a
    description of the wrong types, lengths or ranges (`checkpoints.check_description`), weights that
    do not fit) raises PredictionError or errors.SettingsError with one sentence.
    """
    path = Path(path)
    if path.is_dir():
        raise PredictionError(f"Model file '{path}' is a folder; give the best_model.pth or model.onnx inside it.")
    if not path.is_file():
        raise PredictionError(f"Model file '{path}' does not exist.")
    unusable = f"'{path}' is not a usable model file of this project"
    if path.suffix.lower() == ".onnx":
        try:
            session = deploy.onnx_session(path)
            description = deploy.onnx_metadata(session)
            outputs = session.get_outputs()[0].shape[-1]  # the class count, or a name when it is not fixed
        except Exception as error:  # a foreign or damaged file is the user's to fix
            raise PredictionError(f"{unusable}: it cannot be read as an exported model ({brief(error)}).") from None
        checkpoints.check_description(path, description)
        if isinstance(outputs, int):
            checkpoints.check_outputs(path, description, outputs)
        return (lambda images: deploy.onnx_logits(session, images)), description
    try:
        checkpoint = checkpoints.load_checkpoint(path, map_location="cpu")
    except Exception as error:
        raise PredictionError(f"{unusable}: it is damaged, truncated or not a checkpoint ({brief(error)}).") from None
    try:
        model = checkpoints.load_model(checkpoint, path)
    except errors.SettingsError:
        raise  # its description, one sentence naming the field
    except Exception as error:
        raise PredictionError(f"{unusable}: its weights do not rebuild a {checkpoint['arch']!r} model "
                              f"({brief(error)}).") from None
    try:
        model = model.to(device)
    except Exception as error:
        raise PredictionError(f"Device '{device}' is not usable here ({brief(error)}).") from None
    return (lambda images: model(images.to(device)).float().cpu()), checkpoint


def find_images(inputs: list[str]) -> tuple[list[str], list[str]]:
    """The image files to classify: files as given, folders searched recursively for image files
    (hidden files and folders ignored, sorted). Also one sentence per folder holding no image."""
    paths, empty_folders = [], []
    for item in inputs:
        if not os.path.isdir(item):
            paths.append(item)  # a missing or unreadable file is reported with the predictions
            continue
        found = [path for path in folders.visible_files(item) if folders.is_image_name(path)]
        if not found:
            empty_folders.append(f"folder '{item}' holds no image files (searched recursively for "
                                 f"{', '.join(folders.IMAGE_EXTENSIONS)})")
        paths += found
    return paths, empty_folders


@torch.inference_mode()
def predict_images(
    classify: Classifier, description: dict[str, Any], image_paths: list[str], top_k: int,
    batch_size: int = BATCH_SIZE, model_path: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Top-k classes with probabilities for each image; unreadable images get an 'error' entry.

    Images are fitted to the square as in training (the checkpoint's resize mode; squash for
    checkpoints written before there was a choice) and classified `batch_size` at a time. A
    description that cannot be used, or a model with another number of outputs than class names,
    raises errors.SettingsError naming `model_path` and the field.
    """
    checkpoints.check_description(model_path, description)
    mean = torch.tensor(description["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(description["std"]).view(1, 3, 1, 1)
    class_names = description["class_names"]
    resize = description.get("resize", "squash")
    k = min(top_k, len(class_names))
    predictions: list[dict[str, Any]] = []
    for start in range(0, len(image_paths), batch_size):
        entries, pixels = [], []
        for image_path in image_paths[start : start + batch_size]:
            try:
                pixels.append(decoding.decode_image(image_path, description["image_size"], resize))
                entries.append({"image": image_path})
            except decoding.UnreadableImage as error:  # missing, a folder, not an image, damaged
                entries.append({"image": image_path, "error": f"cannot read image: {error}"})
        if pixels:
            images = (torch.stack(pixels).float() / 255 - mean) / std
            logits = classify(images).float()
            checkpoints.check_outputs(model_path, description, logits.shape[-1])
            ranked = utils.ranked_classes(logits, k)  # the reported figures' rule, ties included
            probabilities = torch.softmax(logits, dim=1).gather(1, ranked)
            readable = [entry for entry in entries if "error" not in entry]
            for entry, values, indices in zip(readable, probabilities.tolist(), ranked.tolist(), strict=True):
                entry["top"] = [{"class": class_names[i], "probability": round(p, 6)}
                                for p, i in zip(values, indices, strict=True)]
        predictions += entries
    return predictions


def predictions_csv(predictions: list[dict[str, Any]], k: int) -> str:
    """CSV text, one row per image: its path, the top `k` classes with probabilities, and the
    reason it could not be read (empty when it was classified); text cells as `utils.spreadsheet_cell`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", *[f"{column}_{rank}" for rank in range(1, k + 1) for column in ("class", "probability")],
                     "error"])
    for prediction in predictions:
        cells = [cell for entry in prediction.get("top", [])
                 for cell in (utils.spreadsheet_cell(entry["class"]), entry["probability"])]
        writer.writerow([utils.spreadsheet_cell(prediction["image"]), *cells, *[""] * (2 * k - len(cells)),
                         utils.spreadsheet_cell(prediction.get("error", ""))])
    return buffer.getvalue()


def format_predictions(predictions: list[dict[str, Any]]) -> str:
    """Readable text: each image followed by its top classes and probabilities (names and paths `printable`)."""
    lines = []
    for prediction in predictions:
        lines.append(utils.printable(prediction["image"]))
        if "error" in prediction:
            lines.append(f"  error: {utils.printable(prediction['error'])}")
            continue
        for rank, entry in enumerate(prediction["top"], start=1):
            lines.append(f"  {rank}. {utils.printable(entry['class']):<20} {100 * entry['probability']:6.2f}%")
    return "\n".join(lines)


def command_line_parser() -> argparse.ArgumentParser:
    """The flags of prediction_for_one.py: a model file, the images, and how to show their classes."""
    parser = argparse.ArgumentParser(description="Classify images with a trained checkpoint (best_model.pth).",
                                     allow_abbrev=False)  # --top must not silently mean --top-k
    parser.add_argument("--model", "--model_path", dest="model", required=True,
                        help="path to a best_model.pth or model.onnx")
    parser.add_argument("images", nargs="+", help="image files, or folders searched recursively for them")
    parser.add_argument("--top-k", type=int, default=3,
                        help="how many classes to show per image (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--csv", metavar="FILE", default=None,
                        help="write one row per image to FILE (path, top classes, probabilities, or why it could not "
                             "be read); the console then shows a summary unless --json is given")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Classify the given images and folders; exit 0 when all were classified, 1 when some could
    not be read or a folder holds no image (the others are still classified; each problem is named
    on stderr), 2 for a bad model file or setting."""
    args = command_line_parser().parse_args(argv)
    # The shell leaves '~' alone in --model=~/x; expand it as a user expects.
    args.model, args.images = os.path.expanduser(args.model), [os.path.expanduser(image) for image in args.images]
    if args.top_k < 1:
        print("error: --top-k must be at least 1.", file=sys.stderr)
        return 2
    image_paths, empty_folders = find_images(args.images)
    try:
        classify, description = load_classifier(args.model, torch.device(args.device))
        predictions = predict_images(classify, description, image_paths, args.top_k, model_path=args.model)
    except (PredictionError, errors.SettingsError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = [p for p in predictions if "error" in p]
    if args.csv is not None:
        try:
            utils.write_text(args.csv, predictions_csv(predictions, min(args.top_k, len(description["class_names"]))))
        except OSError as error:
            print(f"error: cannot write --csv '{args.csv}': {error.strerror or error}.", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(predictions, indent=2))
    elif args.csv is not None:
        print(f"Wrote {len(predictions)} row{'s' if len(predictions) != 1 else ''} to {args.csv}: "
              f"{len(predictions) - len(failed)} classified, {len(failed)} unreadable.")
    elif predictions:
        print(format_predictions(predictions))
    for sentence in empty_folders:
        print(f"error: {sentence}.", file=sys.stderr)
    for prediction in failed:
        print(f"error: '{utils.printable(prediction['image'])}': {utils.printable(prediction['error'])}",
              file=sys.stderr)
    if failed and len(failed) < len(predictions):
        print(f"{len(failed)} of {len(predictions)} images could not be read; the others were classified.",
              file=sys.stderr)
    return 1 if failed or empty_folders else 0


if __name__ == "__main__":
    sys.exit(main())
