"""The MLP head: a scikit-learn-style estimator over discrepancy vectors.

``DiscrepancyHead`` is a two-layer MLP (d -> hidden -> 2 logits) trained with cross-entropy and
AdamW (the paper: lr 1e-3, weight decay 1e-3, 50 epochs); only the head is trained.
``predict_proba`` returns columns ``[p_real, p_fake]`` (``classes_ == [0, 1]``), so
``p_fake = predict_proba(X)[:, 1]`` is ``softmax(logits)[1]``.

Training is seeded and deterministic on the CPU: the same data, options and seed give the same
weights bit for bit (initialisation and shuffling draw from private generators).

Checkpoints are ``HEAD.safetensors`` (weights, with all metadata as JSON in the safetensors
header) plus a readable ``HEAD.json`` copy of that metadata. No pickle. ``load`` checks the
header size, every metadata field it or detection relies on, and the tensors' names, shapes and
dtypes before it builds anything, so a damaged or hand-edited file is one clear ``CheckpointError``.

A head file is of one of two kinds, named by its metadata field ``head.kind``:

- ``mlp`` (absent in heads written before the field existed): the trained :class:`DiscrepancyHead`;
- ``one-class``: the training-free :class:`OneClassHead` of ``tidy-detect calibrate``, which scores
  the image-caption discrepancy against a threshold set on real images only. It holds no tensors:
  its two numbers (threshold and scale) are in the metadata. Written as format version 2, so that
  an older tidy-detect says it must be upgraded instead of misreading it; MLP heads are still
  written as version 1.

:func:`load_head` reads either kind, from a local file or a Hugging Face hub reference (see
:mod:`tidy_detect.sharing`); both give ``predict_proba`` columns ``[p_real, p_fake]``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import struct
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np

from tidy_detect.config import GLOBAL_VIEWS, RepresentationConfig
from tidy_detect.errors import CheckpointError, ConfigError, NotFittedError
from tidy_detect.evaluate.metrics import detection_metrics
from tidy_detect.sharing import local_head_file, resolve_head

log = logging.getLogger(__name__)

HEAD_FORMAT = "tidy-detect-head"
HEAD_FORMAT_VERSION = 2  # the newest version this code reads
MLP_FORMAT_VERSION = 1  # MLP heads need nothing of version 2: older readers keep reading them
ONE_CLASS_FORMAT_VERSION = 2
HEAD_KINDS = ("mlp", "one-class")
# Representations whose vector is a discrepancy of image and caption (I0 and T0 alone are not).
ONE_CLASS_REPRESENTATIONS = ("global", "local", "both")
ONE_CLASS_SCORE = "half-squared-norm"
SELECT_CHOICES = ("last", "best-val")
PRECISIONS = ("auto", "float32", "bfloat16")

# Budgets for what a checkpoint may ask of ``load``. A head's metadata is a few kilobytes (the
# history grows ~100 bytes an epoch); safetensors itself allows a 100 MB header, which we would
# then parse a second time as JSON.
MAX_HEADER_BYTES = 16 * 2**20
MAX_WIDTH = 65536
MAX_EPOCHS = 1_000_000
MAX_BATCH_SIZE = 2**24
WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")

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
        # The bounds load() enforces, so that every head fit() makes can be loaded again.
        for name, limit in (("hidden", MAX_WIDTH), ("epochs", MAX_EPOCHS), ("batch_size", MAX_BATCH_SIZE)):
            _check(getattr(self, name) <= limit, f"{name} must be <= {limit}, got {getattr(self, name)!r}")
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
        if X.shape[1] > MAX_WIDTH:
            raise ConfigError(f"X must have at most {MAX_WIDTH} features per row, got {X.shape[1]}")
        if not set(np.unique(y).tolist()) <= {0, 1}:
            raise ConfigError(f"labels must be 0 (real) or 1 (fake), got {sorted(set(np.unique(y).tolist()))}")
        if not np.isfinite(X).all():
            raise ConfigError("X contains NaN or infinite values")
        if self.select == "best-val" and X_val is None:
            raise ConfigError("--select best-val needs validation data (--val STORE)")

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
        """Write ``path`` (.safetensors) and its ``.json`` twin; returns the safetensors path.

        Each file is written under a unique temporary name and renamed into place, so a reader never
        sees half a head; both get the permissions of any new file (the user's umask applies).
        """
        from safetensors.torch import save as safetensors_bytes

        from tidy_detect import __version__

        self._check_fitted()
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": HEAD_FORMAT, "format_version": MLP_FORMAT_VERSION, "package_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "head": {"kind": "mlp", **self.get_params(), "precision_used": getattr(self, "precision_", None),
                     "n_features": int(self.n_features_in_),
                     "chosen_epoch": int(self.chosen_epoch_), "classes": [0, 1],
                     "proba_columns": ["p_real", "p_fake"]},
            "history": getattr(self, "history_", []),
            **(metadata or {}),
        }
        meta = json_safe(meta)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.model_.state_dict().items()}
        # In memory, then our own open(): safetensors' save_file creates its file 0600 whatever
        # the umask. A head is a few megabytes at most.
        _write_atomic(path, safetensors_bytes(tensors, metadata={"tidy_detect": json.dumps(meta, allow_nan=False)}))
        _write_atomic(path.with_suffix(".json"), (json.dumps(meta, indent=2, allow_nan=False) + "\n").encode("utf-8"))
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", *,
             pipeline: bool = True) -> tuple["DiscrepancyHead", dict[str, Any]]:
        """Read a checkpoint; returns (head, metadata).

        Everything is checked before a network is built or a tensor read: the safetensors header
        size (at most ``MAX_HEADER_BYTES``), the metadata (format and version, the head's sizes and
        hyperparameters, and the ``representation`` and ``extraction`` records that detection and
        evaluation use), and that the file holds exactly the tensors those sizes imply.

        Args:
            path: the ``.safetensors`` file (the suffix may be left off).
            device: where the head runs.
            pipeline: require ``representation`` and ``extraction`` (written by ``tidy-detect train``);
                pass False for a bare estimator saved by :meth:`save` without them.

        Raises:
            CheckpointError: missing or unreadable file, not a tidy-detect head, or a metadata field
                or tensor that breaks a rule (the message names the file, the field, the rule and
                the value).
        """
        import torch
        from safetensors import safe_open

        path = local_head_file(path)
        _check_header_size(path)
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
        with handle:
            raw = (handle.metadata() or {}).get("tidy_detect")
            if raw is None:
                raise CheckpointError(f"{path}: a safetensors file without tidy-detect metadata; "
                                      f"not a head checkpoint")
            meta = validate_metadata(raw, path, pipeline=pipeline)
            if meta["head"].get("kind", "mlp") != "mlp":
                raise CheckpointError(f"{path}: a {meta['head']['kind']} head, not an MLP head; load it with "
                                      f"tidy_detect.head.load_head, which reads every kind")
            hidden, n_features = meta["head"]["hidden"], meta["head"]["n_features"]
            layout = {name: (tuple(handle.get_slice(name).get_shape()), handle.get_slice(name).get_dtype())
                      for name in handle.keys()}
            _check_layout(path, layout, hidden, n_features)
            try:
                tensors = {name: handle.get_tensor(name) for name in layout}
            except Exception as exc:
                raise CheckpointError(f"{path}: cannot read the weights ({exc})") from exc
        for name, tensor in tensors.items():
            if not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"{path}: tensor {name} holds NaN or infinite values; the head is damaged")
        params = {k: v for k, v in meta["head"].items() if k in cls().get_params()}
        head = cls(**params, device=device)
        model = head._build(n_features)
        try:
            model.load_state_dict(tensors)
        except RuntimeError as exc:  # the layout check above should make this unreachable
            raise CheckpointError(f"{path}: weights do not match the recorded architecture ({exc})") from exc
        head.model_ = model.to(device).eval()
        head.n_features_in_ = n_features
        head.classes_ = np.array([0, 1])
        head.history_ = meta.get("history", [])
        head.chosen_epoch_ = meta["head"].get("chosen_epoch", head.epochs)
        return head, meta


class OneClassHead:
    """A detector that needs no fake images: the image-caption discrepancy, thresholded on reals.

    The score of a row is ``s = ||X||^2 / 2`` for its representation vector ``X``. For the
    ``global`` representation on L2-normalised embeddings, ``X = |I0 - T0|`` and
    ``s = 1 - cos(I0, T0)`` exactly: the image-caption dissimilarity of the paper's Fig. 1b, where
    real images agree with their captions more than generated ones do. For ``local`` (the mean of
    the objects' ``|I_i - T_i|``) it is ``1 - cos`` of the one object when there is one, and at most
    the objects' mean ``1 - cos`` otherwise; for ``both``, that of ``w1*D_g + w2*D_l``.

    ``fit`` sets the threshold on real rows only, at the false-positive rate ``fpr``: the
    ``ceil((1 - fpr)(n + 1))``-th smallest of the ``n`` real scores (the split-conformal quantile),
    so that a new real image from the same distribution scores above it with probability at most
    ``fpr``. ``p_fake = sigmoid((s - threshold) / scale)``: exactly 0.5 at the threshold, so the
    usual rule ``p_fake > 0.5`` flags ``s > threshold``, and monotone in ``s`` (AP and AUC are those
    of ``s``). ``scale`` puts the median real calibration image at ``p_fake = fpr``. The score is
    therefore not a calibrated probability of being fake: no fake image was seen.

    Args:
        fpr: the target false-positive rate, in (0, 0.5).

    Learned attributes (after ``fit``): ``threshold_``, ``scale_``, ``n_features_in_``,
    ``n_calibration_``, ``classes_`` (``[0, 1]``).
    """

    kind = "one-class"
    MIN_ABOVE = 5

    def __init__(self, fpr: float = 0.05) -> None:
        self.fpr = fpr

    def get_params(self) -> dict[str, Any]:
        return {"fpr": self.fpr}

    def _validate_params(self) -> None:
        _check(_is_number(self.fpr) and 0 < self.fpr < 0.5, f"fpr must be in (0, 0.5), got {self.fpr!r}")

    @staticmethod
    def discrepancy(X: np.ndarray) -> np.ndarray:
        """The raw score ``||X||^2 / 2`` of each row (float64); ``1 - cos(I0, T0)`` for ``global``."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2:
            raise ConfigError(f"X must be (N, d), got shape {X.shape}")
        return 0.5 * np.einsum("ij,ij->i", X, X)

    @staticmethod
    def threshold_rank(n: int, fpr: float) -> int:
        """The 1-based rank, among ``n`` sorted real scores, of the one that is the threshold."""
        return math.ceil(round((1 - fpr) * (n + 1), 9))  # rounded: 0.95 * 100 is not exactly 95 in binary

    @classmethod
    def min_rows(cls, fpr: float) -> int:
        """Fewest real scores :meth:`fit_scores` accepts at ``fpr``: enough that at least
        ``MIN_ABOVE`` of them lie above the threshold, so that more than one or two images set it."""
        n = math.ceil(round(cls.MIN_ABOVE / fpr, 9))
        while n - cls.threshold_rank(n, fpr) < cls.MIN_ABOVE:
            n += 1
        return n

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> "OneClassHead":
        """Calibrate on the representation vectors ``X`` of real images (``y``, if given, must be all 0).

        Returns:
            self

        Raises:
            ConfigError: a bad ``fpr``, a fake label in ``y``, too few rows, or scores without spread.
        """
        X = np.asarray(X)
        if y is not None and np.any(np.asarray(y) != 0):
            raise ConfigError("a one-class head is calibrated on real images only (label 0); y holds other labels")
        if X.ndim != 2 or not 1 <= X.shape[1] <= MAX_WIDTH:
            raise ConfigError(f"X must be (N, d) with 1 <= d <= {MAX_WIDTH}, got shape {X.shape}")
        return self.fit_scores(self.discrepancy(X), X.shape[1])

    def fit_scores(self, scores: np.ndarray, n_features: int) -> "OneClassHead":
        """Calibrate on the scores (:meth:`discrepancy`) of real images with ``n_features``-wide vectors.

        Returns:
            self

        Raises:
            ConfigError: a bad ``fpr``, fewer than :meth:`min_rows` scores, non-finite scores, or
                scores without spread (the threshold equals the median).
        """
        self._validate_params()
        scores = np.sort(np.asarray(scores, dtype=np.float64).ravel())
        n = len(scores)
        if n < self.min_rows(self.fpr):
            raise ConfigError(f"calibrating at fpr {self.fpr:g} needs at least {self.min_rows(self.fpr)} real "
                              f"rows (so that at least {self.MIN_ABOVE} lie above the threshold), got {n}")
        if not np.isfinite(scores).all():
            raise ConfigError("the real scores contain NaN or infinite values")
        threshold = float(scores[self.threshold_rank(n, self.fpr) - 1])
        median = float(np.median(scores))
        if not threshold > median:
            raise ConfigError(f"the real scores have no spread: the {1 - self.fpr:.0%} quantile ({threshold:.6g}) "
                              f"equals the median; are the images or captions all the same?")
        self.threshold_ = threshold
        self.scale_ = (threshold - median) / math.log((1 - self.fpr) / self.fpr)
        self.n_features_in_ = int(n_features)
        self.n_calibration_ = n
        self.classes_ = np.array([0, 1])
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "threshold_"):
            raise NotFittedError("This OneClassHead is not calibrated yet; call fit(X) on real images or load a head "
                                 "file first.")

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """``(s - threshold) / scale``: positive means fake, like :meth:`DiscrepancyHead.decision_function`."""
        self._check_fitted()
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise CheckpointError(f"the head takes {self.n_features_in_} features per row, got shape {X.shape}; "
                                  f"was it calibrated on features of another CLIP model?")
        return (self.discrepancy(X) - self.threshold_) / self.scale_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, 2) scores, columns ``[p_real, p_fake]``; ``p_fake`` is 0.5 exactly at the threshold."""
        from scipy.special import expit

        p_fake = expit(self.decision_function(X))
        return np.stack([1.0 - p_fake, p_fake], axis=1)

    def predict(self, X: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """1 (fake) where ``p_fake > threshold``, else 0 (at 0.5: where the score is over the threshold)."""
        return (self.predict_proba(X)[:, 1] > threshold).astype(np.int64)

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write ``path`` (.safetensors, no tensors: the numbers are in its metadata) and its ``.json`` twin.

        Returns:
            the safetensors path.

        Raises:
            NotFittedError: the head is not calibrated.
        """
        from safetensors.numpy import save as safetensors_bytes

        from tidy_detect import __version__

        self._check_fitted()
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json_safe({
            "format": HEAD_FORMAT, "format_version": ONE_CLASS_FORMAT_VERSION, "package_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "head": {"kind": self.kind, "score": ONE_CLASS_SCORE, "fpr": self.fpr, "threshold": self.threshold_,
                     "scale": self.scale_, "n_features": self.n_features_in_,
                     "calibration_rows": self.n_calibration_, "classes": [0, 1],
                     "proba_columns": ["p_real", "p_fake"]},
            **(metadata or {}),
        })
        _write_atomic(path, safetensors_bytes({}, metadata={"tidy_detect": json.dumps(meta, allow_nan=False)}))
        _write_atomic(path.with_suffix(".json"), (json.dumps(meta, indent=2, allow_nan=False) + "\n").encode("utf-8"))
        return path

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "OneClassHead":
        """The head described by metadata that :func:`validate_metadata` accepted."""
        section = meta["head"]
        head = cls(fpr=section["fpr"])
        head.threshold_ = float(section["threshold"])
        head.scale_ = float(section["scale"])
        head.n_features_in_ = int(section["n_features"])
        head.n_calibration_ = int(section["calibration_rows"])
        head.classes_ = np.array([0, 1])
        return head

    @classmethod
    def load(cls, path: str | Path, *, pipeline: bool = True) -> tuple["OneClassHead", dict[str, Any]]:
        """Read a one-class head file; returns (head, metadata).

        Raises:
            CheckpointError: missing or unreadable file, another kind of head, or a metadata field
                that breaks its rule.
        """
        path = local_head_file(path)
        meta = read_metadata(path, pipeline=pipeline)
        if meta["head"].get("kind", "mlp") != cls.kind:
            raise CheckpointError(f"{path}: a {meta['head'].get('kind', 'mlp')} head, not a one-class head; load it "
                                  f"with tidy_detect.head.load_head, which reads every kind")
        return cls.from_metadata(meta), meta


def read_metadata(path: str | Path, *, pipeline: bool = True) -> dict[str, Any]:
    """The checked metadata of a local head file of any kind, without building the head.

    Also checks that the file holds the tensors its kind needs (a one-class head: none; an MLP:
    it is checked again, with the shapes, when :meth:`DiscrepancyHead.load` builds it).

    Raises:
        CheckpointError: missing or unreadable file, not a head, or a metadata field that breaks its rule.
    """
    from safetensors import safe_open

    path = local_head_file(path)
    _check_header_size(path)
    try:
        handle = safe_open(str(path), framework="numpy")
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    with handle:
        raw = (handle.metadata() or {}).get("tidy_detect")
        names = sorted(handle.keys())
    if raw is None:
        raise CheckpointError(f"{path}: a safetensors file without tidy-detect metadata; not a head checkpoint")
    meta = validate_metadata(raw, path, pipeline=pipeline)
    if meta["head"].get("kind") == "one-class" and names:
        raise CheckpointError(f"{path}: a one-class head holds no tensors (its threshold and scale are metadata); "
                              f"this file has {', '.join(names[:5])}")
    return meta


def load_head(reference: str | Path, device: str = "cpu", *,
              pipeline: bool = True) -> tuple["DiscrepancyHead | OneClassHead", dict[str, Any]]:
    """Read a head of any kind from a local file or a Hugging Face hub reference; returns (head, metadata).

    ``reference`` is a path (``.safetensors`` may be left off), or, when no such file exists,
    ``ORG/REPO[@REVISION][/FILE.safetensors]`` on the hub (see :func:`tidy_detect.sharing.resolve_head`).
    Both kinds give ``predict_proba(X)`` with columns ``[p_real, p_fake]``.

    Args:
        device: where an MLP head runs (a one-class head runs in NumPy).
        pipeline: require ``representation`` and ``extraction`` (see :meth:`DiscrepancyHead.load`).

    Raises:
        CheckpointError: no such file or hub file, not downloadable (offline, say: the message
            says what to do), or a damaged or foreign head file.
    """
    path = resolve_head(reference)
    meta = read_metadata(path, pipeline=pipeline)
    if meta["head"].get("kind", "mlp") == OneClassHead.kind:
        return OneClassHead.from_metadata(meta), meta
    return DiscrepancyHead.load(path, device, pipeline=pipeline)


def _write_atomic(path: Path, data: bytes) -> None:
    from tidy_detect.features.store import temporary_path

    tmp = temporary_path(path)
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_header_size(path: Path) -> None:
    """Refuse a header over our budget before safetensors reads it (its own limit is 100 MB)."""
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the head checkpoint ({exc})") from None
    if len(prefix) < 8:
        raise CheckpointError(f"{path}: not a readable safetensors file (it is {len(prefix)} bytes long, "
                              f"shorter than the 8-byte header length)")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: not a readable safetensors file (its header claims {length} bytes, "
                              f"over the {MAX_HEADER_BYTES // 2**20} MiB limit for a head checkpoint); "
                              f"the file is damaged or not a head")


def _check_layout(path: Path, layout: dict[str, tuple[tuple[int, ...], str]], hidden: int, n_features: int) -> None:
    """The tensors must be exactly those of ``n_features -> hidden -> 2``."""
    expected = {"0.weight": (hidden, n_features), "0.bias": (hidden,), "2.weight": (2, hidden), "2.bias": (2,)}
    extra = sorted(set(layout) - set(expected))
    missing = sorted(set(expected) - set(layout))
    if extra or missing:
        problems = ([f"unexpected {', '.join(extra)}"] if extra else []) + \
                   ([f"missing {', '.join(missing)}"] if missing else [])
        raise CheckpointError(f"{path}: a head holds exactly the tensors {', '.join(expected)}; "
                              f"this file has {'; '.join(problems)}")
    for name, shape in expected.items():
        found, dtype = layout[name]
        if found != shape:
            raise CheckpointError(
                f"{path}: tensor {name} must have shape {shape} for metadata head.hidden={hidden} and "
                f"head.n_features={n_features}, got {found}")
        if dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} must be floating point ({', '.join(WEIGHT_DTYPES)}), "
                                  f"got {dtype}")


# -- metadata validation -----------------------------------------------------------------------

def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Fields:
    """Typed reads of one metadata section; every failure names the file, the field, the rule, the value."""

    def __init__(self, path: Path, section: dict[str, Any], prefix: str = "") -> None:
        self.path, self.section, self.prefix = path, section, prefix

    def fail(self, key: str, rule: str, value: Any) -> NoReturn:
        raise CheckpointError(f"{self.path}: metadata field {self.prefix}{key} must be {rule}, got {_show(value)}")

    def get(self, key: str, rule: str, ok: Callable[[Any], bool], required: bool) -> Any:
        if key not in self.section:
            if required:
                raise CheckpointError(f"{self.path}: metadata field {self.prefix}{key} is missing; "
                                      f"it must be {rule}")
            return None
        value = self.section[key]
        if not ok(value):
            self.fail(key, rule, value)
        return value

    def integer(self, key: str, low: int, high: int, required: bool = False) -> int | None:
        return self.get(key, f"an integer in {low}..{high}", lambda v: _is_int(v) and low <= v <= high, required)

    def number(self, key: str, rule: str, ok: Callable[[float], bool], required: bool = False) -> float | None:
        return self.get(key, rule, lambda v: _is_number(v) and ok(v), required)

    def boolean(self, key: str, required: bool = False) -> bool | None:
        return self.get(key, "true or false", lambda v: isinstance(v, bool), required)

    def choice(self, key: str, choices: tuple[Any, ...], required: bool = False, nullable: bool = False) -> Any:
        rule = f"one of {', '.join(map(str, choices))}" + (" or null" if nullable else "")
        return self.get(key, rule, lambda v: (v is None and nullable) or (isinstance(v, str) and v in choices),
                        required)

    def string(self, key: str, required: bool = False, nullable: bool = False) -> str | None:
        rule = "a non-empty string" + (" or null" if nullable else "")
        return self.get(key, rule, lambda v: (v is None and nullable) or (isinstance(v, str) and v.strip() != ""),
                        required)

    def text(self, key: str) -> str | None:
        """Free text that may be empty or null (a prompt, a version)."""
        return self.get(key, "a string or null", lambda v: v is None or isinstance(v, str), False)

    def strings(self, key: str) -> list[str] | None:
        return self.get(key, "a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                        False)

    def numbers(self, key: str) -> list[float] | None:
        return self.get(key, "a list of numbers", lambda v: isinstance(v, list) and all(_is_number(x) for x in v),
                        False)

    def section_of(self, key: str, required: bool = False) -> "_Fields | None":
        value = self.get(key, "a JSON object", lambda v: isinstance(v, dict), required)
        return None if value is None else _Fields(self.path, value, f"{self.prefix}{key}.")


def validate_metadata(raw: str, path: str | Path, *, pipeline: bool = True) -> dict[str, Any]:
    """Parse and check a head's metadata JSON (see :meth:`DiscrepancyHead.load`); returns it as a dict.

    Unknown keys are kept (``save`` takes extra metadata), except in ``representation``, which
    becomes a :class:`~tidy_detect.config.RepresentationConfig`.

    Raises:
        CheckpointError: not JSON, not an object, or a field that breaks its rule.
    """
    path = Path(path)
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path}: the tidy-detect metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the tidy-detect metadata must be a JSON object, got {type(meta).__name__}")
    top = _Fields(path, meta)
    top.choice("format", (HEAD_FORMAT,), required=True)
    version = top.get("format_version", "a positive integer", lambda v: _is_int(v) and v >= 1, True)
    if version > HEAD_FORMAT_VERSION:
        raise CheckpointError(f"{path}: head format version {version} is newer than this tidy-detect reads "
                              f"(up to {HEAD_FORMAT_VERSION}); upgrade tidy-detect to use this head")
    for key in ("package_version", "created", "fingerprint"):
        top.text(key)

    head = top.section_of("head", required=True)
    kind = head.choice("kind", HEAD_KINDS) or "mlp"  # heads from before the field are MLPs
    if kind == "one-class":
        if version < ONE_CLASS_FORMAT_VERSION:
            top.fail("format_version", f">= {ONE_CLASS_FORMAT_VERSION} for a one-class head", version)
        n_features = _check_one_class(head)
    else:
        n_features = _check_mlp(head)
    head.get("classes", "[0, 1]", lambda v: v == [0, 1] and all(_is_int(x) for x in v), False)
    head.get("proba_columns", '["p_real", "p_fake"]', lambda v: v == ["p_real", "p_fake"], False)
    dim = top.integer("dim", 1, MAX_WIDTH)
    if dim is not None and dim != n_features:
        # every representation has one value per CLIP dimension
        top.fail("dim", f"equal to head.n_features ({n_features})", dim)
    top.get("history", "a list of JSON objects", lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v),
            False)
    training = top.section_of("training")
    if training is not None:
        training.get("data", "a JSON object or null", lambda v: v is None or isinstance(v, dict), False)
    top.section_of("metrics")

    if kind == "one-class" and "representation" not in meta:
        raise CheckpointError(f"{path}: metadata field representation is missing; a one-class head's score is "
                              f"defined by it")
    for key in ("representation", "extraction"):
        if pipeline and key not in meta:
            raise CheckpointError(f"{path}: metadata field {key} is missing; detection needs it (heads from "
                                  f"`tidy-detect train` record it; a bare DiscrepancyHead.save loads with "
                                  f"DiscrepancyHead.load(path, pipeline=False))")
    representation = top.section_of("representation")
    if representation is not None:
        _check_representation(representation)
        if kind == "one-class":
            representation.choice("kind", ONE_CLASS_REPRESENTATIONS, required=True)
            representation.get("normalize", "true for a one-class head (its score is 1 - cos on unit vectors)",
                               lambda v: v is True, True)
    extraction = top.section_of("extraction")
    if extraction is not None:
        _check_extraction(extraction, n_features)
    return meta


def _check_mlp(head: _Fields) -> int:
    head.integer("hidden", 1, MAX_WIDTH, required=True)
    n_features = head.integer("n_features", 1, MAX_WIDTH, required=True)
    # The hyperparameters below do not change inference and older heads lack some of them
    # (precision came later): absent means the default, present must be valid.
    epochs = head.integer("epochs", 1, MAX_EPOCHS)
    head.integer("batch_size", 1, MAX_BATCH_SIZE)
    head.integer("seed", -2**63, 2**64 - 1)  # what torch.manual_seed accepts
    head.number("lr", "a number > 0", lambda v: v > 0)
    head.number("weight_decay", "a number >= 0", lambda v: v >= 0)
    head.choice("select", SELECT_CHOICES)
    head.boolean("balance")
    head.choice("precision", PRECISIONS)
    head.choice("precision_used", ("float32", "bfloat16"), nullable=True)
    head.integer("chosen_epoch", 1, epochs or MAX_EPOCHS)
    return n_features


def _check_one_class(head: _Fields) -> int:
    """The fields :meth:`OneClassHead.from_metadata` builds the head from; all required."""
    n_features = head.integer("n_features", 1, MAX_WIDTH, required=True)
    head.choice("score", (ONE_CLASS_SCORE,), required=True)
    head.number("fpr", "a number in (0, 0.5)", lambda v: 0 < v < 0.5, required=True)
    head.number("threshold", "a number >= 0", lambda v: v >= 0, required=True)
    head.number("scale", "a number > 0", lambda v: v > 0, required=True)
    head.integer("calibration_rows", 1, 2**63 - 1, required=True)
    return n_features


def _check_representation(rep: _Fields) -> None:
    known = ("kind", "w1", "w2", "normalize")
    unknown = sorted(set(rep.section) - set(known))
    if unknown:
        raise CheckpointError(f"{rep.path}: metadata field representation has unknown key {unknown[0]!r}; "
                              f"known: {', '.join(known)}")
    rep.get("kind", "a string", lambda v: isinstance(v, str), True)
    rep.number("w1", "a number >= 0", lambda v: v >= 0, required=True)
    rep.number("w2", "a number >= 0", lambda v: v >= 0, required=True)
    rep.boolean("normalize", required=True)
    try:  # the remaining rules (known kinds, w1 + w2 > 0) live with the config
        RepresentationConfig(**rep.section)
    except ConfigError as exc:
        raise CheckpointError(f"{rep.path}: metadata field representation: {exc}") from None


def _check_extraction(extraction: _Fields, n_features: int) -> None:
    # The rules match ModelConfig and FeatureConfig: any extraction a store can record passes.
    # clip.source may be absent: the synthetic stores of `tidy-detect bench` record none, and
    # evaluation does not need it.
    clip = extraction.section_of("clip", required=True)
    dim = clip.integer("dim", 1, MAX_WIDTH)
    if dim is not None and dim != n_features:
        clip.fail("dim", f"equal to head.n_features ({n_features})", dim)
    clip.integer("image_size", 1, MAX_WIDTH)
    clip.choice("global_view", GLOBAL_VIEWS)
    clip.get("view_size", f"an integer in 8..{MAX_WIDTH} or null",
             lambda v: v is None or (_is_int(v) and 8 <= v <= MAX_WIDTH), False)
    clip.numbers("mean")
    clip.numbers("std")
    captioner = extraction.section_of("captioner", required=True)
    captioner.string("name", required=True)
    captioner.integer("max_tokens", 1, 512)
    captioner.integer("num_beams", 1, 1024)
    captioner.text("prompt")
    grounder = extraction.section_of("grounder", required=True)
    grounder.string("name", required=True)
    for key in ("box_threshold", "text_threshold"):
        grounder.get(key, "a number in [0, 1] or null", lambda v: v is None or (_is_number(v) and 0 <= v <= 1), False)
    from tidy_detect.config import GROUNDING_RULES

    grounder.get("grounding_rule", f"one of {', '.join(GROUNDING_RULES)} or null",
                 lambda v: v is None or v in GROUNDING_RULES, False)
    grounder.get("min_box_size", "a number >= 0 or null", lambda v: v is None or (_is_number(v) and v >= 0), False)
    for section in (clip, captioner, grounder):
        section.get("dtype", "float32, bfloat16, float16 or null",
                    lambda v: v is None or v in ("float32", "bfloat16", "float16"), False)
    for section in (clip, captioner, grounder):
        section.string("source", nullable=True)
        for key in ("model_type", "revision", "weights"):
            section.text(key)
    phrases = extraction.section_of("phrases")  # detection falls back to the defaults without it
    if phrases is not None:
        phrases.integer("max_objects", 0, 64)
        phrases.strings("stoplist")
        phrases.text("spacy_model")
        phrases.text("spacy_version")


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
