"""Adapt an M-IDoL encoder to a labelled set: linear probe on cached features, LoRA, or full fine-tuning.

    python examples/finetune_classification.py --model DIR_OR_NAME --data DATA --modality oct \\
        --mode linear-probe|lora|finetune --epochs 20 --output-dir runs/oct

DATA is a folder with one sub-folder per class, a CSV (``path,label``, or ``path,A,B,...`` with
0/1 columns for multi-label), or a MedMNIST-style .npz with train/val/test splits. Folders and
CSVs take --val/--test sets of the same kind, or are split by --split fractions (by the CSV's
--group-column, e.g. patient id, so no patient spans two sets).

The best epoch on validation is saved to OUTPUT_DIR/model (load it with
``midol_hub.MIDoLForImageClassification.from_pretrained``); with ``--mode lora`` to
OUTPUT_DIR/adapter, the LoRA matrices and task head alone (``midol_hub.load_lora(load_model(MODEL),
OUTPUT_DIR/adapter)`` gives the model back). OUTPUT_DIR/metrics.json holds
``val`` and ``test`` blocks: accuracy, balanced accuracy, macro AUC (``auc``), macro F1,
per-class metrics and the confusion matrix.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from midol_hub import (
    DatasetError,
    ImageReadError,
    MIDoLForImageClassification,
    ModelNotFoundError,
    WeightsNotAvailableError,
    best_thresholds,
    classification_metrics,
    extract_features,
    fit_linear_probe,
    from_csv,
    from_folder,
    from_npz,
    get_transform,
    group_split,
    layerwise_lr_groups,
    load_lora,
    load_model,
    lora_classifier,
    run_command,
    save_lora,
)

PROBE_CS = (0.01, 0.1, 1.0, 10.0)  # logistic-regression strengths tried on validation


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registry name, model directory or Hub id")
    parser.add_argument("--data", required=True, help="class folders, a CSV or an .npz")
    parser.add_argument("--modality", required=True, help="xray, fundus, oct, dermoscopy or pathology (aliases work)")
    parser.add_argument("--mode", choices=("linear-probe", "lora", "finetune"), default="linear-probe")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--lr", type=float, default=None, help="finetune: default 5e-4 x batch/256; lora: 1e-3")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lora-targets", default="qkv,proj", help="lora: Swin block layers to adapt, from qkv,proj,fc1,fc2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--layer-decay", type=float, default=0.75, help="layer-wise lr decay when fine-tuning (RETFound)")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--patience", type=int, default=5, help="epochs without validation gain before stopping")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val", default=None, help="validation set (same kind as --data)")
    parser.add_argument("--test", default=None, help="test set (same kind as --data)")
    parser.add_argument("--split", default="0.7,0.15,0.15", help="train,val,test fractions when --val/--test are not given")
    parser.add_argument("--label-columns", default=None, help="CSV: comma-separated label columns (default: all but path)")
    parser.add_argument("--group-column", default=None, help="CSV: column whose groups never span two sets")
    parser.add_argument("--feature", choices=("embedding", "pooled"), default="embedding",
                        help="the modality expert's embedding (default) or the pooled backbone feature")
    parser.add_argument("--cache-dir", default=None, help="feature cache (default: OUTPUT_DIR/feature_cache)")
    parser.add_argument("--random-weights", action="store_true", help="the architecture with random weights (no trained weights needed)")
    return parser.parse_args(argv)


def read_sets(args: argparse.Namespace):
    """(train, val, test) labelled sets from the arguments."""
    def read(path: str, split: str | None = None):
        suffix = Path(path).suffix.lower()
        if suffix == ".npz":
            return from_npz(path, split or "train")
        if suffix == ".csv":
            columns = args.label_columns.split(",") if args.label_columns else None
            return from_csv(path, columns, group_column=args.group_column)
        return from_folder(path)

    if args.data.endswith(".npz"):
        return read(args.data, "train"), read(args.val or args.data, "val"), read(args.test or args.data, "test")
    data = read(args.data)
    if args.val and args.test:
        return data, read(args.val), read(args.test)
    fractions = [float(f) for f in args.split.split(",")]
    return tuple(group_split(data, fractions, seed=args.seed))


def scores_of(logits: torch.Tensor, multilabel: bool) -> np.ndarray:
    return (logits.sigmoid() if multilabel else logits.softmax(-1)).numpy()


def loss_of(logits: torch.Tensor, labels: torch.Tensor, multilabel: bool, smoothing: float) -> torch.Tensor:
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    return F.cross_entropy(logits, labels.long(), label_smoothing=smoothing)


def validation_score(labels: np.ndarray, scores: np.ndarray) -> float:
    """Model selection: macro AUC where defined, else balanced accuracy."""
    metrics = classification_metrics(labels, scores)
    return metrics["auc"] if np.isfinite(metrics["auc"]) else metrics["balanced_accuracy"]


def train_linear_probe(encoder, model, sets, args, cache_dir):
    """Fit the head on cached frozen features: a logistic regression on standardised features
    whose regularisation is chosen on validation, written into the model's standardising norm
    and linear classifier. Returns val and test scores."""
    features = [extract_features(encoder, s.images, args.modality, args.feature, cache_dir, progress=True) for s in sets]
    probe = fit_linear_probe(features[0], sets[0].labels, features[1], sets[1].labels, cs=PROBE_CS, seed=args.seed)
    model.load_linear_probe(probe)
    with torch.no_grad():
        head = torch.nn.Sequential(model.norm, model.classifier).eval()
        return [scores_of(head(f), s.multilabel) for f, s in zip(features[1:], sets[1:])]


def predict(model, data, transform, batch_size) -> np.ndarray:
    model.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            batch = torch.stack([transform(image) for image in data.images[start : start + batch_size]])
            outputs.append(model(batch).logits)
    return scores_of(torch.cat(outputs), data.multilabel)


def train_epochs(model, parameters, sets, args, transform, save) -> dict:
    """AdamW over ``parameters`` with random flips; after each epoch the validation score decides
    whether ``save()`` keeps it, and ``--patience`` epochs without gain stop the run."""
    optimizer = torch.optim.AdamW(parameters, lr=args.lr)
    train, labels = sets[0], torch.as_tensor(sets[0].labels)
    best, waited, seconds = -1.0, 0, []
    for _ in tqdm(range(args.epochs), desc=args.mode, unit="epoch"):
        start_time = time.perf_counter()
        model.train()
        order = torch.randperm(len(train))
        for start in range(0, len(order), args.batch_size):
            batch = order[start : start + args.batch_size].tolist()
            pixels = torch.stack([transform(train.images[i]) for i in batch])
            pixels = torch.where(torch.rand(len(batch), 1, 1, 1) < 0.5, pixels.flip(-1), pixels)  # random flips
            loss = loss_of(model(pixels).logits, labels[batch], train.multilabel, args.label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start_time)
        score = validation_score(sets[1].labels, predict(model, sets[1], transform, args.batch_size))
        if score > best:
            best, waited = score, 0
            save()
        else:
            waited += 1
            if waited >= args.patience:
                break
    return {"epochs": len(seconds), "seconds_per_epoch": float(np.mean(seconds))}


def train_finetune(model, sets, args, output_dir):
    """Fine-tune encoder and head with layer-wise lr decay; returns val and test scores."""
    transform = get_transform(model.midol, args.modality)
    args.lr = args.lr or 5e-4 * args.batch_size / 256
    groups = layerwise_lr_groups(model, args.lr, args.layer_decay, args.weight_decay)
    timing = train_epochs(model, groups, sets, args, transform, lambda: model.save_pretrained(output_dir / "model"))
    best_model = MIDoLForImageClassification.from_pretrained(output_dir / "model")
    return [predict(best_model, s, transform, args.batch_size) for s in sets[1:]], timing


def train_lora(encoder, sets, args, output_dir):
    """Train LoRA matrices in the Swin blocks and the task head, the encoder frozen; returns val
    and test scores of the best epoch, reloaded from its adapter folder onto the base model."""
    train = sets[0]
    model = lora_classifier(encoder, train.class_names, args.modality, train.multilabel, args.feature,
                            rank=args.lora_rank, alpha=args.lora_alpha, targets=args.lora_targets.split(","))
    transform = get_transform(encoder, args.modality)
    args.lr = args.lr or 1e-3
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim > 1], "weight_decay": args.weight_decay},
              {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0}]
    timing = train_epochs(model, groups, sets, args, transform, lambda: save_lora(model, output_dir / "adapter"))
    best_model = load_lora(encoder, output_dir / "adapter")
    return [predict(best_model, s, transform, args.batch_size) for s in sets[1:]], timing, trainable


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    encoder = load_model(args.model, pretrained=not args.random_weights)
    train, val, test = sets = read_sets(args)
    for name, part in (("train", train), ("val", val), ("test", test)):
        if len(part) == 0:
            raise DatasetError(f"the {name} set is empty; adjust --split or pass --{name}")
    model = MIDoLForImageClassification.from_encoder(encoder, train.class_names, args.modality, train.multilabel, args.feature)
    trainable = [p for p in model.parameters() if p.requires_grad]
    start_time = time.perf_counter()
    if args.mode == "linear-probe":
        cache_dir = Path(args.cache_dir or output_dir / "feature_cache")
        val_scores, test_scores = train_linear_probe(encoder, model, sets, args, cache_dir)
        model.save_pretrained(output_dir / "model")
        trainable = [model.classifier.weight, model.classifier.bias]
        timing = {"epochs": 1, "seconds_per_epoch": time.perf_counter() - start_time}  # features + regression
    elif args.mode == "lora":
        (val_scores, test_scores), timing, trainable = train_lora(encoder, sets, args, output_dir)
    else:
        (val_scores, test_scores), timing = train_finetune(model, sets, args, output_dir)
    thresholds = best_thresholds(val.labels, val_scores) if train.multilabel else None
    metrics = {
        "mode": args.mode,
        "model": args.model,
        "modality": args.modality,
        "classes": train.class_names,
        "sizes": {"train": len(train), "val": len(val), "test": len(test)},
        "trainable_parameters": sum(p.numel() for p in trainable),
        **timing,
        "thresholds": None if thresholds is None else thresholds.tolist(),
        "val": classification_metrics(val.labels, val_scores, train.class_names, thresholds),
        "test": classification_metrics(test.labels, test_scores, train.class_names, thresholds),
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        test = run(args)["test"]
        print(f"test: accuracy {test['accuracy']:.3f}, balanced accuracy {test['balanced_accuracy']:.3f}, "
              f"AUC {test['auc']:.3f}, F1 {test['f1']:.3f}; saved to {args.output_dir}")

    return run_command("finetune_classification", body,
                       (DatasetError, ImageReadError, ModelNotFoundError, WeightsNotAvailableError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
