"""The MLP head: a scikit-learn-style estimator over discrepancy vectors.

``DiscrepancyHead`` is a two-layer MLP (d -> hidden -> 2 logits) trained with cross-entropy and
AdamW (the paper: lr 1e-3, weight decay 1e-3, 50 epochs); only the head is trained.
``predict_proba`` returns columns ``[p_real, p_fake]`` (``classes_ == [0, 1]``), so
``p_fake = predict_proba(X)[:, 1]`` is ``softmax(logits)[1]``.

Training is seeded and deterministic on the CPU: the same data, options and seed give the same
weights bit for bit (initialisation and shuffling draw from private generators).

Checkpoints are ``HEAD.safetensors`` (weights, with all metadata as JSON in the safetensors
header) plus a readable ``HEAD.json`` copy of that metadata. No pickle.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tidy_detect.errors import CheckpointError, ConfigError, NotFittedError
from tidy_detect.evaluate.metrics import detection_metrics

log = logging.getLogger(__name__)

HEAD_FORMAT = "tidy-detect-head"
HEAD_FORMAT_VERSION = 1
SELECT_CHOICES = ("last", "best-val")
PRECISIONS = ("auto", "float32", "bfloat16")

EpochFn = Callable[[dict[str, Any]], None]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


class DiscrepancyHead:
    """Two-layer MLP classifier of discrepancy vectors.

    Args:
        hidden: width of the hidden layer.
        epochs: passes over the training data.
        lr, weight_decay: AdamW settings.
        batch_size: examples per optimisation step.
        seed: seeds initialisation and shuffling.
        select: ``last`` keeps the last epoch (the paper); ``best-val`` keeps the epoch with the best
            validation AP (needs validation data; never select on test data).
        balance: weight the loss by inverse class frequency.
        precision: matmul precision while training: ``bfloat16`` (autocast; weights and optimizer
            state stay float32), ``float32``, or ``auto`` (bfloat16 on GPUs and on CPUs with native
            bfloat16 matmuls). The resolved choice is recorded in ``precision_`` and the checkpoint.
        device: where to train ("cpu", "cuda").

    Learned attributes (after ``fit``): ``model_``, ``n_features_in_``, ``classes_``,
    ``history_`` (per-epoch train loss and validation metrics), ``chosen_epoch_``.
    """

    def __init__(self, hidden: int = 512, epochs: int = 50, lr: float = 1e-3, weight_decay: float = 1e-3,
                 batch_size: int = 256, seed: int = 0, select: str = "last", balance: bool = False,
                 precision: str = "auto", device: str = "cpu") -> None:
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.seed = seed
        self.select = select
        self.balance = balance
        self.precision = precision
        self.device = device

    def get_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("hidden", "epochs", "lr", "weight_decay", "batch_size", "seed",
                                              "select", "balance", "precision")}

    def _validate_params(self) -> None:
        _check(isinstance(self.hidden, int) and self.hidden >= 1, f"hidden must be >= 1, got {self.hidden!r}")
        _check(isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be >= 1, got {self.epochs!r}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1,
               f"batch_size must be >= 1, got {self.batch_size!r}")
        _check(self.select in SELECT_CHOICES, f"select must be one of {', '.join(SELECT_CHOICES)}, got {self.select!r}")
        _check(self.precision in PRECISIONS,
               f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def _build(self, n_features: int) -> Any:
        import torch
        from torch import nn

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return nn.Sequential(nn.Linear(n_features, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 2))

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
            on_epoch: EpochFn | None = None) -> "DiscrepancyHead":
        """Train on (X, y); optional validation data is scored after every epoch.

        Args:
            X: (N, d) float features. y: (N,) labels in {0, 1}.
            on_epoch: called with each epoch's record (epoch, loss, val_loss, val_ap, seconds).

        Returns:
            self
        """
        import torch
        from torch import nn

        self._validate_params()
        X = np.ascontiguousarray(X, dtype=np.float32)
        y = np.asarray(y).astype(np.int64)
        if X.ndim != 2 or len(X) != len(y):
            raise ConfigError(f"X must be (N, d) with one label per row, got X {X.shape} and y {y.shape}")
        if len(X) == 0:
            raise ConfigError("no training examples (every row had an error or no label?)")
        if not set(np.unique(y).tolist()) <= {0, 1}:
            raise ConfigError(f"labels must be 0 (real) or 1 (fake), got {sorted(set(np.unique(y).tolist()))}")
        if not np.isfinite(X).all():
            raise ConfigError("X contains NaN or infinite values")
        if self.select == "best-val" and X_val is None:
            raise ConfigError("select='best-val' needs validation data (--val STORE)")

        model = self._build(X.shape[1]).to(self.device)
        self.precision_ = self._resolve_precision()
        # Fused AdamW updates all parameters in one kernel; per-parameter Python steps would
        # cost more than this small MLP's matmuls.
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay,
                                      fused=self.device == "cpu" or self.device.startswith("cuda"))
        weight = None
        if self.balance:
            counts = np.bincount(y, minlength=2).astype(np.float64)
            weight = torch.tensor(len(y) / (2.0 * np.maximum(counts, 1)), dtype=torch.float32, device=self.device)
        loss_fn = nn.CrossEntropyLoss(weight=weight)
        X_t = torch.from_numpy(X).to(self.device)
        if self.precision_ == "bfloat16":
            # The first layer casts its input to bfloat16 under autocast anyway: casting once here
            # gives the same numbers, and halves the bytes each step's gather moves.
            X_t = X_t.to(torch.bfloat16)
        y_t = torch.from_numpy(y).to(self.device)
        generator = torch.Generator().manual_seed(self.seed)
        history: list[dict[str, Any]] = []
        best_state, best_key = None, None
        autocast = torch.autocast(device_type="cuda" if self.device.startswith("cuda") else "cpu",
                                  dtype=torch.bfloat16, enabled=self.precision_ == "bfloat16")
        for epoch in range(1, self.epochs + 1):
            started = time.perf_counter()
            model.train()
            order = torch.randperm(len(X_t), generator=generator).to(self.device)
            total = torch.zeros((), device=self.device)
            for start in range(0, len(order), self.batch_size):
                # Each step gathers its own rows: a batch fits in cache where it is used next, so
                # this is ~10% faster than gathering the whole shuffled matrix once per epoch
                # (same rows, same weights bit for bit).
                rows = order[start:start + self.batch_size]
                xb, yb = X_t.index_select(0, rows), y_t.index_select(0, rows)
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    loss = loss_fn(model(xb), yb)
                loss.backward()
                optimizer.step()
                total += loss.detach().float() * len(xb)
            record: dict[str, Any] = {"epoch": epoch, "loss": float(total) / len(order)}
            if X_val is not None and y_val is not None and len(X_val):
                self.model_ = model
                self.n_features_in_ = X.shape[1]
                val = detection_metrics(y_val, self.predict_proba(X_val)[:, 1])
                record.update(val_loss=val["loss"], val_ap=val["ap"], val_acc=val["acc"])
                key = (np.nan_to_num(val["ap"], nan=-1.0), -val["loss"])
                if self.select == "best-val" and (best_key is None or key > best_key):
                    best_key = key
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    self.chosen_epoch_ = epoch
            record["seconds"] = time.perf_counter() - started
            history.append(record)
            if on_epoch:
                on_epoch(record)
        if self.select == "best-val" and best_state is not None:
            model.load_state_dict(best_state)
        else:
            self.chosen_epoch_ = self.epochs
        model.eval()
        self.model_ = model
        self.n_features_in_ = X.shape[1]
        self.classes_ = np.array([0, 1])
        self.history_ = history
        return self

    def _resolve_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        if self.device.startswith("cuda"):
            return "bfloat16"
        from tidy_detect.models.optimize import cpu_has_fast_bf16

        return "bfloat16" if cpu_has_fast_bf16() else "float32"

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError("This DiscrepancyHead is not fitted yet; call fit(X, y) or load a checkpoint first.")

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Logit margin (fake minus real) for each row."""
        logits = self._logits(X)
        return logits[:, 1] - logits[:, 0]

    def _logits(self, X: np.ndarray) -> np.ndarray:
        import torch

        self._check_fitted()
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise CheckpointError(f"the head takes {self.n_features_in_} features per row, got shape {X.shape}; "
                                  f"was it trained on features of another CLIP model?")
        out = []
        with torch.inference_mode():
            for start in range(0, len(X), 65536):
                chunk = torch.from_numpy(X[start:start + 65536]).to(self.device)
                out.append(self.model_(chunk).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2), np.float32)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, 2) probabilities, columns ``[p_real, p_fake]``."""
        logits = self._logits(X).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """1 (fake) where ``p_fake > threshold``, else 0."""
        return (self.predict_proba(X)[:, 1] > threshold).astype(np.int64)

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write ``path`` (.safetensors) and its ``.json`` twin; returns the safetensors path."""
        from safetensors.torch import save_file

        from tidy_detect import __version__

        self._check_fitted()
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": HEAD_FORMAT, "format_version": HEAD_FORMAT_VERSION, "package_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "head": {**self.get_params(), "precision_used": getattr(self, "precision_", None),
                     "n_features": int(self.n_features_in_),
                     "chosen_epoch": int(self.chosen_epoch_), "classes": [0, 1],
                     "proba_columns": ["p_real", "p_fake"]},
            "history": getattr(self, "history_", []),
            **(metadata or {}),
        }
        meta = json_safe(meta)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.model_.state_dict().items()}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"tidy_detect": json.dumps(meta, allow_nan=False)})
        tmp.replace(path)
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> tuple["DiscrepancyHead", dict[str, Any]]:
        """Read a checkpoint; returns (head, metadata).

        Raises:
            CheckpointError: missing or unreadable file, or not a tidy-detect head.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file() and path.with_suffix(".safetensors").is_file():
            path = path.with_suffix(".safetensors")
        if not path.is_file():
            raise CheckpointError(f"{path}: no such head checkpoint; train one with `tidy-detect train`")
        try:
            with safe_open(str(path), framework="pt") as handle:
                raw = (handle.metadata() or {}).get("tidy_detect")
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
        if raw is None:
            raise CheckpointError(f"{path}: a safetensors file without tidy-detect metadata; not a head checkpoint")
        meta = json.loads(raw)
        if meta.get("format") != HEAD_FORMAT or meta.get("format_version", 0) > HEAD_FORMAT_VERSION:
            raise CheckpointError(f"{path}: head format {meta.get('format')!r} v{meta.get('format_version')} "
                                  f"is not one this tidy-detect reads")
        params = {k: v for k, v in meta["head"].items() if k in cls().get_params()}
        head = cls(**params, device=device)
        model = head._build(int(meta["head"]["n_features"]))
        try:
            model.load_state_dict(tensors)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: weights do not match the recorded architecture ({exc})") from exc
        head.model_ = model.to(device).eval()
        head.n_features_in_ = int(meta["head"]["n_features"])
        head.classes_ = np.array([0, 1])
        head.history_ = meta.get("history", [])
        head.chosen_epoch_ = int(meta["head"].get("chosen_epoch", head.epochs))
        return head, meta


def json_safe(value: Any) -> Any:
    """Plain JSON values: NumPy scalars and arrays converted, NaN and infinities as null."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if np.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value
